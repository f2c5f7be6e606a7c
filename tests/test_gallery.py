"""Gallery recordings: tiles found, names read off their plates, one student per participant.

The galleries are drawn here from real face photos (``../shared/data/facial_expressions_dev``,
one person per name) with name plates in the styles meeting UIs use (Zoom's dark plate,
Teams' tinted one, a light one, Meet's bare text with a shadow), sizes from 2×2 to 5×5, and
layout changes. The test knows who sits in which tile, so it checks names and counts
exactly. ``test_gallery_browser.py`` does the same with a recording of Janus's own demo page.
"""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from classlens.analysis import analyze_recording
from kernel.settings import load_settings
from tests import media_factory
from tests.conftest import DATA_DIR, MEDIA_DIR, require, stored_analysis
from vision.gallery import find_tiles, tile_of
from vision.labels import TesseractReader, TileNamer, clean_name

PHOTOS = DATA_DIR / "facial_expressions_dev" / "images"
#: Six different people, one photo each.
PEOPLE = ("George_W_Bush", "Colin_Powell", "Tony_Blair", "Jennifer_Capriati", "Serena_Williams", "Gerhard_Schroeder",
          "Hugo_Chavez", "Ariel_Sharon", "Donald_Rumsfeld", "John_Ashcroft", "Junichiro_Koizumi", "Jean_Chretien",
          "Gloria_Macapagal_Arroyo", "Vladimir_Putin", "Laura_Bush", "Lleyton_Hewitt", "Jacques_Chirac",
          "Tom_Ridge", "Hans_Blix", "Andre_Agassi", "John_Negroponte", "Kofi_Annan", "Nestor_Kirchner",
          "Alvaro_Uribe", "Michael_Bloomberg")
#: Display names as people type them: spaces, accents, apostrophes, hyphens.
NAMES = ("Zoë Martín", "Seán O'Neill", "Ana Lee", "Jean-Luc Dubois", "Björn Ågren", "Chloé Fontaine",
         "Łukasz Nowak", "María José Pérez", "D'Arcy Smith", "Noor Al-Hassan", "Olivia Brown", "Ilse Müller",
         "Tomás Ríos", "Amélie Roy", "Kai Tanaka", "Søren Holm", "Fatima Zahra", "Ethan Clarke", "Inès Garnier",
         "Mateo Ruiz", "Grace O'Connor", "Yusuf Demir", "Leïla Haddad", "Piotr Zieliński", "Hannah Weiß")

pytestmark = [pytest.mark.media]


def _photo(person: str) -> np.ndarray:
    require(PHOTOS.is_dir(), f"needs {PHOTOS}")
    paths = sorted(PHOTOS.glob(f"{person}_*.jpg"))
    require(bool(paths), f"needs a photo of {person} in {PHOTOS}")
    image = cv2.imread(str(paths[0]))
    assert image is not None
    return image


def _frame(participants: list[tuple[np.ndarray, str | None]], columns: int, style: str = "zoom") -> np.ndarray:
    canvas = np.full((media_factory.GALLERY_SIZE[1], media_factory.GALLERY_SIZE[0], 3),
                     media_factory.GALLERY_BACKGROUND, np.uint8)
    for box, (photo, name) in zip(media_factory.grid_tiles(len(participants), columns), participants, strict=True):
        media_factory.draw_tile(canvas, box, photo, name, style)
    return canvas


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@pytest.mark.parametrize(("count", "columns"), [(4, 2), (5, 3), (9, 3), (12, 4), (16, 4), (25, 5)])
def test_grids_from_2x2_to_5x5_are_found_tile_by_tile(count: int, columns: int) -> None:
    photo = _photo(PEOPLE[0])
    image = _frame([(photo, None)] * count, columns)
    layout = find_tiles(image)
    expected = sorted((y, x, y + h, x + w) for x, y, w, h in media_factory.grid_tiles(count, columns))
    found = [(t.y0, t.x0, t.y1, t.x1) for t in layout.tiles]
    assert layout.is_gallery
    assert found == expected


@pytest.mark.parametrize("name", ["12_angry_men.jpg", "solvay_conference.jpg", "multi_face.jpg", "single_face.jpg"])
def test_a_camera_picture_is_not_a_gallery(name: str) -> None:
    image = cv2.imread(str(MEDIA_DIR / name))
    require(image is not None, f"needs {MEDIA_DIR / name}")
    assert not find_tiles(image).is_gallery


@pytest.mark.parametrize("name", ["WolfgangLanger_Pexels.mp4", "single_face.mp4", "face_noface.mov"])
def test_no_frame_of_a_camera_video_is_a_gallery(name: str) -> None:
    with av.open(str(MEDIA_DIR / name)) as container:
        frames = [frame.to_ndarray(format="bgr24") for index, frame in enumerate(container.decode(video=0))
                  if index % 15 == 0]
    assert frames
    assert not any(find_tiles(frame).is_gallery for frame in frames)


def test_a_screen_share_has_no_tile_with_a_face() -> None:
    """A slide shared full screen: text lines and a chart on white, no video tile and no face."""
    slide = np.full((720, 1280, 3), 255, np.uint8)
    cv2.putText(slide, "Week 5: Photosynthesis", (80, 110), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (40, 40, 40), 4)
    for row in range(6):
        cv2.putText(slide, f"- point number {row + 1} of the lecture", (100, 220 + 60 * row),
                    cv2.FONT_HERSHEY_SIMPLEX, 1.0, (60, 60, 60), 2)
    cv2.rectangle(slide, (800, 250), (1180, 600), (200, 120, 40), -1)
    layout = find_tiles(slide)
    assert not layout.is_gallery


@pytest.mark.ocr
@pytest.mark.parametrize("style", sorted(media_factory.PLATE_STYLES))
@pytest.mark.parametrize(("count", "columns"), [(4, 2), (9, 3), (16, 4)])
def test_names_are_read_off_every_plate_style(style: str, count: int, columns: int) -> None:
    """Names read exactly (after NFC) for nearly every tile, and never another tile's name.

    The 4×4 grid's names are 11 px high, as small as meeting UIs draw them; a letter or a
    word may be lost there (docs/benchmarks.md has the rates), but a misread must never
    name the wrong participant.
    """
    participants = [(_photo(PEOPLE[i]), NAMES[i]) for i in range(count)]
    image = _frame(participants, columns, style)
    layout = find_tiles(image)
    names = TileNamer(TesseractReader()).names(image, layout, layout.tiles, 0.0)
    read = {tile: named.name for tile, named in names.items()}
    expected = {tile: _nfc(NAMES[index]) for index, tile in enumerate(layout.tiles)}
    exact = sum(read.get(tile) == name for tile, name in expected.items())
    assert exact >= 0.85 * count, {expected[t]: read.get(t) for t in expected if read.get(t) != expected[t]}
    assert not [t for t, name in read.items() if name != expected[t] and name in expected.values()]


@pytest.mark.ocr
def test_tiles_without_a_readable_label_have_no_name() -> None:
    scribble = "~~ ## %% 0101"
    image = _frame([(_photo(PEOPLE[0]), None), (_photo(PEOPLE[1]), scribble), (_photo(PEOPLE[2]), "Ana Lee"),
                    (_photo(PEOPLE[3]), None)], 2)
    layout = find_tiles(image)
    named = TileNamer(TesseractReader()).names(image, layout, layout.tiles, 0.0)
    assert {n.name for n in named.values()} == {"Ana Lee"}
    assert clean_name("640x360") is None and clean_name("0 kbits/sec") is None
    assert clean_name("l Ana Lee l") == "Ana Lee"


# --------------------------------------------------------------------------- whole recordings

def _class_recording() -> io.BytesIO:
    """Eight seconds of a class: a 2×2 gallery, then a late joiner and a leaver make it five tiles in three columns.

    Two participants share the name "Ana Lee" and swap places at the change; one
    participant's tile carries no label.
    """
    zoe, sean, ana, other_ana, jean, silent = (_photo(p) for p in PEOPLE[:6])
    return media_factory.gallery_recording([
        (4, [(zoe, "Zoë Martín"), (sean, "Seán O'Neill"), (ana, "Ana Lee"), (other_ana, "Ana Lee")], 2),
        (4, [(jean, "Jean-Luc Dubois"), (zoe, "Zoë Martín"), (other_ana, "Ana Lee"), (ana, "Ana Lee"),
             (silent, None)], 3),
    ])


@pytest.mark.ocr
def test_a_gallery_recording_gives_one_named_student_per_participant(isolated_env: Path, components: Any) -> None:
    outcome = analyze_recording(_class_recording(), load_settings(), out_dir=isolated_env / "report",
                                components=components, title="gallery class")
    analysis, students, observations, _ = stored_analysis(outcome.analysis_id)
    assert analysis.layout == "gallery"
    by_label = {s.label: s for s in students}
    assert sorted(by_label) == sorted(["Zoë Martín", "Seán O'Neill", "Ana Lee", "Ana Lee [2]", "Jean-Luc Dubois",
                                       "Student 1"])
    assert {s.label: s.name_source for s in students} == {
        "Zoë Martín": "label", "Seán O'Neill": "label", "Ana Lee": "label", "Ana Lee [2]": "label",
        "Jean-Luc Dubois": "label", "Student 1": "none"}
    # Zoë and both Ana Lees are there for all 8 samples: moving to another tile (and, for the
    # Ana Lees, swapping places) neither ends their student nor starts another one.
    assert [by_label[name].samples_visible for name in ("Zoë Martín", "Ana Lee", "Ana Lee [2]")] == [8, 8, 8]
    assert by_label["Seán O'Neill"].last_seen == 3.0 and by_label["Jean-Luc Dubois"].first_seen == 4.0
    assert outcome.students == 6
    report = (outcome.report_dir / "index.html").read_text(encoding="utf-8")
    assert "Zoë Martín" in report and "Seán O&#39;Neill" in report
    assert "one tile per participant, named by its label" in report and "Gallery recording" in report
    pages = {path.name: path.read_text(encoding="utf-8") for path in (outcome.report_dir / "students").glob("*.html")}
    named = [page for name, page in pages.items() if "jean-luc" in name.lower()]
    assert len(named) == 1 and "read off the name label of their tile" in named[0]
    numbered = [page for name, page in pages.items() if "student-1" in name.lower()]
    assert len(numbered) == 1 and "no name was available" in numbered[0]
    assert {o.track_id for o in observations} == {s.track_id for s in students}


@pytest.mark.ocr
def test_opted_out_names_are_never_analysed(isolated_env: Path, components: Any) -> None:
    outcome = analyze_recording(_class_recording(), load_settings(recording_opt_out=["seán o'neill"]),
                                out_dir=isolated_env / "report", components=components)
    analysis, students, observations, _ = stored_analysis(outcome.analysis_id)
    assert "Seán O'Neill" not in {s.label for s in students}
    assert not [o for o in observations if o.stream.startswith("Seán")]
    assert analysis.consent_mode == "opt_out"
    assert len(students) == 5


def test_the_camera_layout_never_splits_a_gallery(isolated_env: Path, components: Any) -> None:
    outcome = analyze_recording(_class_recording(), load_settings(video_layout="camera"),
                                out_dir=isolated_env / "report", components=components)
    analysis, students, _, _ = stored_analysis(outcome.analysis_id)
    assert analysis.layout == "camera"
    assert all(s.label.startswith("Student ") and s.name_source == "none" for s in students)


def test_a_camera_video_stays_one_picture(isolated_env: Path, components: Any) -> None:
    outcome = analyze_recording(MEDIA_DIR / "single_face.mp4", load_settings(), out_dir=isolated_env / "report",
                                components=components)
    analysis, students, _, _ = stored_analysis(outcome.analysis_id)
    assert analysis.layout == "camera"
    assert [s.label for s in students] == ["Student 1"]


def test_faces_belong_to_the_tile_holding_their_centre() -> None:
    image = _frame([(_photo(PEOPLE[0]), None)] * 4, 2)
    layout = find_tiles(image)
    boxes = np.array([[10, 10, 50, 50], [700, 400, 760, 460], [636, 0, 645, 5]], np.float32)
    assert tile_of(layout, boxes).tolist() == [0, 3, -1]


def test_a_speaker_view_with_a_filmstrip_is_found_tile_by_tile() -> None:
    """Zoom's speaker view: the speaker large, the others in a strip of small tiles above."""
    canvas = np.full((720, 1280, 3), media_factory.GALLERY_BACKGROUND, np.uint8)
    strip = [(8 + i * 208, 8, 200, 112) for i in range(5)]
    speaker = (240, 128, 800, 584)
    for index, box in enumerate([*strip, speaker]):
        media_factory.draw_tile(canvas, box, _photo(PEOPLE[index]), NAMES[index])
    layout = find_tiles(canvas)
    assert layout.is_gallery
    assert sorted((t.x0, t.y0, t.width, t.height) for t in layout.tiles) == sorted([*strip, speaker])


@pytest.mark.ocr
def test_an_active_speaker_highlight_keeps_its_tile_and_name() -> None:
    """A coloured frame around the speaking participant's tile (Zoom's green, Teams' purple) is no gutter."""
    participants = [(_photo(PEOPLE[i]), NAMES[i]) for i in range(4)]
    image = _frame(participants, 2)
    x, y, width, height = media_factory.grid_tiles(4, 2)[1]
    cv2.rectangle(image, (x, y), (x + width - 1, y + height - 1), (60, 200, 60), 3)
    layout = find_tiles(image)
    assert len(layout.tiles) == 4 and layout.is_gallery
    names = TileNamer(TesseractReader()).names(image, layout, layout.tiles, 0.0)
    # The highlight reaches a pixel or two into the gutter, so that tile is a little larger: order by centre.
    in_reading_order = sorted(layout.tiles, key=lambda t: ((t.y0 + t.y1) // 100, t.x0))
    assert [names[tile].name for tile in in_reading_order] == [_nfc(name) for name in NAMES[:4]]
