"""Benchmark: gallery recordings. Names read off tiles, students found, and what layout detection and OCR cost.

Three measurements, all on material built in memory here (no file is written but the
temporary store and reports of each analysis):

* **Names** on synthetic galleries held out from the tests and from every choice of the
  OCR's constants: other people (``../shared/data/facial_expressions_dev``), other display
  names, three other typefaces, four plate styles (Zoom's translucent black plate, Teams'
  near-opaque one, a light plate, Meet's bare text on a dark gradient), grids from 2×2 to
  5×5. A name counts when it matches exactly after Unicode NFC normalisation.
* **Cost per frame** of finding the tiles (720p and 1080p) and of one OCR reading of every
  tile of a frame (what a new or changed layout costs once).
* **Throughput** of ``classlens analyze`` at 1 fps on the 60-second 3×3 gallery of
  ``benchmarks/analyze.py``: ``--layout camera`` against the default ``auto``, and the same
  gallery with name plates on its tiles (students found and names read).

Usage::

    python benchmarks/gallery.py [--seconds 60] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import shlex
import statistics
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlmodel import select

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere (its own folder is on the path already)
    sys.path.insert(0, str(REPO_ROOT))

import analyze  # noqa: E402  (benchmarks/analyze.py: its gallery video, machine description and docs writer)

from classlens.analysis import analyze_recording  # noqa: E402
from kernel.settings import load_settings  # noqa: E402
from kernel.store import Student, init_store, session_scope  # noqa: E402
from pipeline.models import PipelineComponents  # noqa: E402
from tests import media_factory  # noqa: E402
from vision.gallery import find_tiles  # noqa: E402
from vision.labels import TesseractReader, TileNamer  # noqa: E402

SECTION_BEGIN = "<!-- benchmarks/gallery.py: begin -->"
SECTION_END = "<!-- benchmarks/gallery.py: end -->"
PHOTOS = REPO_ROOT.parent / "shared" / "data" / "facial_expressions_dev" / "images"
#: People and names the tests never use (tests/test_gallery.py has its own).
PEOPLE = ("Amelie_Mauresmo", "Winona_Ryder", "Silvio_Berlusconi", "Roh_Moo-hyun", "Rick_Pitino", "Ricardo_Lagos",
          "Recep_Tayyip_Erdogan", "Paradorn_Srichaphan", "Nicole_Kidman", "Mike_Krzyzewski", "Michael_Chang",
          "Mahathir_Mohamad", "Jonathan_Edwards", "John_Bolton", "Jennifer_Aniston", "Jack_Straw", "Hal_Gehman",
          "George_Lopez", "Erika_Harold", "Elena_Bovina", "Bruce_Springsteen", "Yevgeny_Kafelnikov",
          "Wen_Jiabao", "Venus_Williams", "Tim_Henman")
NAMES = ("Émile Zola", "Brigitte O'Hara", "Ngozi Okafor", "Jürgen Weiß", "Ana-María Ruiz", "Liam Murphy",
         "Åsa Lindqvist", "Chidi Eze", "Renée Dupont", "Mohammed Ali Khan", "Zofia Wójcik", "Tiago Conceição",
         "Sinéad Byrne", "Hiroshi Sato", "Dolores Núñez", "Ömer Yılmaz", "Priya Sharma", "Kateřina Nováková",
         "Lars Øvergaard", "Maëlle Le Goff", "Rory McIlroy", "Yuki Mori", "Paulina Żak", "Andrés Peña",
         "Fiona Ní Bhriain")
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf")
GRIDS = ((4, 2), (9, 3), (16, 4), (25, 5))
PLAIN_CAMERA = "analyze.py's gallery, --layout camera"
MEETING_CAMERA = "meeting gallery with names, --layout camera"
MEETING_AUTO = "meeting gallery with names, --layout auto"
LONG_CAMERA = "long meeting gallery with names, --layout camera"
LONG_AUTO = "long meeting gallery with names, --layout auto"


def photo(person: str) -> np.ndarray:
    """The first photo of ``person``."""
    paths = sorted(PHOTOS.glob(f"{person}_*.jpg"))
    if not paths:
        raise SystemExit(f"missing photos of {person} in {PHOTOS}")
    image = cv2.imread(str(paths[0]))
    assert image is not None
    return image


def gallery_frame(count: int, columns: int, style: str, font: str, size: tuple[int, int] = (1280, 720)) -> np.ndarray:
    """One gallery frame of ``count`` held-out participants."""
    canvas = np.full((size[1], size[0], 3), media_factory.GALLERY_BACKGROUND, np.uint8)
    boxes = media_factory.grid_tiles(count, columns, size=size)
    for index, box in enumerate(boxes):
        media_factory.draw_tile(canvas, box, photo(PEOPLE[index]), NAMES[index], style,
                                font=str(Path(media_factory.PLATE_FONT).parent / font))
    return canvas


#: The other OCR candidate: PP-OCRv4's recogniser from the pinned wheel (Apache-2.0), taken from the archive, never
#: installed (../shared/MODELS.md). Its dictionary is Chinese and English: of Latin accents it has only í á é ü.
PPOCR_ARCHIVE = ("rapidocr-onnxruntime==1.4.4", "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
                 "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")


class PaddleReader:
    """PP-OCRv4's text-line recogniser through onnxruntime, as a :class:`vision.labels.LabelReader`.

    The same plates and lines of text that Tesseract reads are given to it (its own text
    detector is not needed there); each comes back as one "word": the line's text with its
    mean character probability as the confidence, CTC-decoded greedily.
    """

    def __init__(self) -> None:
        import onnx
        import onnxruntime

        from kernel.settings import load_settings as settings_now
        from model_export.archives import fetch_archive, read_archive_member

        requirement, sha256, member = PPOCR_ARCHIVE
        archive = fetch_archive(requirement, sha256, settings_now().model_cache_dir)
        model_bytes = read_archive_member(archive, member)
        meta = {prop.key: prop.value for prop in onnx.load_from_string(model_bytes).metadata_props}
        self.characters = ["", *meta["character"].splitlines(), " "]  # CTC blank first; PaddleOCR appends a space
        self.session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])

    def read(self, bands: Any, heights: Any = None) -> list[list[Any]]:
        """One word per band: its decoded text and confidence (``heights`` is Tesseract's concern)."""
        from vision.labels import Word

        words: list[list[Any]] = []
        for band in bands:
            height, width = band.shape[:2]
            scaled = cv2.resize(band, (max(8, min(round(width * 48 / max(height, 1)), 960)), 48))
            tensor = (scaled[:, :, ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5
            probabilities = self.session.run(None, {"x": tensor.transpose(2, 0, 1)[None]})[0][0]
            best = probabilities.argmax(axis=1)
            text, confidences, previous = [], [], 0
            for step, index in enumerate(best):
                if index != previous and index != 0 and index < len(self.characters):
                    text.append(self.characters[index])
                    confidences.append(float(probabilities[step, index]))
                previous = index
            read = "".join(text).strip()
            words.append([Word(read, 100 * float(np.mean(confidences)), 0, 0, width, height, 0)] if read else [])
        return words


NameRow = tuple[str, int, int, int, float, int]
"""(style, tiles, exact names, names read, OCR seconds per frame, names right but for accents and case)."""


def folded(name: str | None) -> str | None:
    """A name without its accents and case ("Zoë Martín" → "zoe martin"), to compare readers letter by letter."""
    if name is None:
        return None
    return "".join(ch for ch in unicodedata.normalize("NFKD", name) if not unicodedata.combining(ch)).casefold()


def name_accuracy(reader_of: Any = TesseractReader) -> tuple[list[NameRow], list[str]]:
    """A :data:`NameRow` per style and grid, and the misreads."""
    rows: list[NameRow] = []
    misreads: list[str] = []
    for style in sorted(media_factory.PLATE_STYLES):
        for count, columns in GRIDS:
            exact = read = letters = 0
            seconds: list[float] = []
            for font in FONTS:
                image = gallery_frame(count, columns, style, font)
                layout = find_tiles(image)
                if len(layout.tiles) != count:
                    misreads.append(f"{style} {count} tiles ({font}): layout found {len(layout.tiles)} tiles")
                namer = TileNamer(reader_of())
                started = time.perf_counter()
                names = namer.names(image, layout, layout.tiles, 0.0)
                seconds.append(time.perf_counter() - started)
                for index, tile in enumerate(layout.tiles[:count]):
                    expected = unicodedata.normalize("NFC", NAMES[index])
                    got = names[tile].name if tile in names else None
                    read += got is not None
                    exact += got == expected
                    letters += got is not None and folded(got) == folded(expected)
                    if got != expected:
                        misreads.append(f"{style} {count} tiles ({font}): {expected!r} read as {got!r}")
            rows.append((style, count * len(FONTS), exact, read, statistics.median(seconds), letters))
    return rows, misreads


def layout_cost() -> list[tuple[str, float]]:
    """Median milliseconds of ``find_tiles`` per frame, by frame size."""
    costs = []
    for label, size in (("1280×720, 3×3", (1280, 720)), ("1920×1080, 5×5", (1920, 1080))):
        columns = 3 if size[0] == 1280 else 5
        image = gallery_frame(columns * columns, columns, "zoom", FONTS[0], size)
        timings = []
        for _ in range(20):
            started = time.perf_counter()
            find_tiles(image)
            timings.append(time.perf_counter() - started)
        costs.append((label, 1000 * statistics.median(timings)))
    return costs


def meeting_gallery(seconds: float) -> io.BytesIO:
    """A meeting's 3×3 gallery as Zoom draws it: 8 px gutters, a Zoom-style name plate on each tile.

    The tiles play ``benchmarks/analyze.py``'s nine clips and photos (that benchmark's own gallery has no gutter
    between rows and no names, which no meeting UI draws).
    """
    from PIL import Image, ImageDraw, ImageFont

    tiles = [analyze.load_tile(analyze.DEFAULT_MEDIA_DIR / name) for name in analyze.TILES]
    boxes = media_factory.grid_tiles(len(tiles), analyze.COLUMNS)
    overlay = Image.new("RGBA", (analyze.WIDTH, analyze.HEIGHT), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.truetype(media_factory.PLATE_FONT, 14)
    for number, (x, y, _width, height) in enumerate(boxes):
        text_width = int(font.getlength(NAMES[number]))
        draw.rounded_rectangle((x + 6, y + height - 30, x + 20 + text_width, y + height - 6), radius=4,
                               fill=(0, 0, 0, 170))
        draw.text((x + 13, y + height - 26), NAMES[number], font=font, fill=(255, 255, 255, 255))
    rgba = np.asarray(overlay)
    alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
    ink = rgba[:, :, 2::-1].astype(np.float32) * alpha

    def frames() -> Iterator[np.ndarray]:
        canvas = np.full((analyze.HEIGHT, analyze.WIDTH, 3), media_factory.GALLERY_BACKGROUND, np.uint8)
        for index in range(round(seconds * analyze.FPS)):
            for tile, (x, y, width, height) in zip(tiles, boxes, strict=True):
                canvas[y:y + height, x:x + width] = cv2.resize(tile.frame_at(index), (width, height))
            yield (canvas * (1 - alpha) + ink).astype(np.uint8)

    return analyze.encode_stream(frames(), analyze.FPS)


def analyse(video: io.BytesIO, components: PipelineComponents, layout: str) -> tuple[float, int, list[str]]:
    """One ``analyze_recording`` at 1 fps: wall seconds, students, and the students' labels."""
    with tempfile.TemporaryDirectory(prefix="classlens-gallery-bench-") as tmp:
        settings = load_settings(data_dir=Path(tmp), sample_fps=1.0, video_layout=layout)
        video.seek(0)
        started = time.perf_counter()
        outcome = analyze_recording(video, settings, out_dir=Path(tmp) / "report", components=components,
                                    title="gallery benchmark")
        wall = time.perf_counter() - started
        engine = init_store(settings.resolved_database_url)
        with session_scope(engine) as session:
            labels = sorted(s.label for s in session.exec(select(Student).where(
                Student.analysis_id == outcome.analysis_id)))
    return wall, outcome.students, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the throughput gallery")
    parser.add_argument("--repeat", type=int, default=3, help="runs per throughput configuration (median)")
    parser.add_argument("--long-seconds", type=float, default=600.0,
                        help="length of the long meeting gallery (one run per layout; 0 skips it)")
    parser.add_argument("--write-docs", action="store_true", help="record the results in docs/benchmarks.md")
    args = parser.parse_args(argv)

    accuracy, misreads = name_accuracy()
    total, exact = sum(r[1] for r in accuracy), sum(r[2] for r in accuracy)
    print(f"names (Tesseract): {exact}/{total} exact ({exact / total:.1%})")
    for line in misreads:
        print("  ", line)
    paddle, paddle_misreads = name_accuracy(PaddleReader)
    print(f"names (PP-OCRv4): {sum(r[2] for r in paddle)}/{sum(r[1] for r in paddle)} exact")
    for line in paddle_misreads[:20]:
        print("  ", line)
    costs = layout_cost()
    print("layout detection:", ", ".join(f"{label} {ms:.1f} ms" for label, ms in costs))

    settings = load_settings(execution_provider="cpu")
    components = PipelineComponents.load(settings)
    plain = analyze.build_gallery_video(analyze.DEFAULT_MEDIA_DIR, args.seconds)
    meeting = meeting_gallery(args.seconds)
    runs: dict[str, list[tuple[float, int, list[str]]]] = {}
    for name, video, layout in ((PLAIN_CAMERA, plain, "camera"), ("analyze.py's gallery, --layout auto", plain, "auto"),
                                (MEETING_CAMERA, meeting, "camera"), (MEETING_AUTO, meeting, "auto")):
        runs[name] = [analyse(video, components, layout) for _ in range(args.repeat)]
        wall = statistics.median(r[0] for r in runs[name])
        print(f"{name}: {wall:.2f} s, {runs[name][0][1]} students: {', '.join(runs[name][0][2])}")
    del plain, meeting
    if args.long_seconds:
        long_meeting = meeting_gallery(args.long_seconds)
        for name, layout in ((LONG_CAMERA, "camera"), (LONG_AUTO, "auto")):
            runs[name] = [analyse(long_meeting, components, layout)]
            print(f"{name}: {runs[name][0][0]:.2f} s, {runs[name][0][1]} students")
    if args.write_docs:
        command = "python benchmarks/gallery.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        analyze.write_docs(docs_section(analyze.machine_info(settings, components), command.strip(), accuracy,
                                        misreads, paddle, costs, runs, args.seconds), SECTION_BEGIN, SECTION_END)
    return 0


def docs_section(info: dict[str, str], command: str, accuracy: list[NameRow], misreads: list[str],
                 paddle: list[NameRow], costs: list[tuple[str, float]],
                 runs: dict[str, list[tuple[float, int, list[str]]]], seconds: float) -> str:
    """This script's section of docs/benchmarks.md."""
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
    by_style: dict[str, list[str]] = {}
    for style, tiles, exact, _read, ocr, _letters in accuracy:
        by_style.setdefault(style, []).append(f"{exact}/{tiles} ({ocr:.2f} s)")
    by_grid: dict[int, list[int]] = {}
    for candidate, rows in ((0, accuracy), (1, paddle)):
        for _style, tiles, exact, _read, _ocr, letters in rows:
            cell = by_grid.setdefault(tiles, [0, 0, 0, 0, 0])
            cell[0] += tiles if candidate == 0 else 0
            cell[1 + 2 * candidate] += exact
            cell[2 + 2 * candidate] += letters

    def share(part: int, whole: int) -> str:
        return f"{part}/{whole} ({part / whole:.0%})"

    grid_rows = "\n".join(f"| {round((tiles // len(FONTS)) ** 0.5)}×{round((tiles // len(FONTS)) ** 0.5)} | "
                           f"{share(cells[1], cells[0])} | {share(cells[2], cells[0])} | {share(cells[3], cells[0])} | "
                           f"{share(cells[4], cells[0])} |" for tiles, cells in by_grid.items())
    paddle_exact = sum(r[2] for r in paddle)
    grid_header = " | ".join(f"{columns}×{columns}" for _, columns in GRIDS)
    name_rows = "\n".join(f"| {style} | " + " | ".join(cells) + " |" for style, cells in by_style.items())
    total, exact = sum(r[1] for r in accuracy), sum(r[2] for r in accuracy)
    read = sum(r[3] for r in accuracy)
    wrong = read - exact
    throughput_rows = []
    for name, results in runs.items():
        wall = statistics.median(r[0] for r in results)
        reference = (PLAIN_CAMERA if name.startswith("analyze") else LONG_CAMERA if name.startswith("long")
                     else MEETING_CAMERA)
        base = statistics.median(r[0] for r in runs[reference])
        throughput_rows.append(f"| {name} | {wall:.2f} | {wall / base:.2f} | {results[0][1]} |")
    named = runs[MEETING_AUTO][0][2]
    expected = sorted(unicodedata.normalize("NFC", name) for name in NAMES[:9])
    found = sum(name in named for name in expected)
    misread_lines = "\n".join(f"  - {line}" for line in misreads[:20]) or "  - none"
    layout_costs = ", ".join(f"{label}: {ms:.1f} ms" for label, ms in costs)
    return f"""{SECTION_BEGIN}
## Gallery recordings: names, layout and their cost (`benchmarks/gallery.py`)

Measured {today}; absolute times hold for this machine only.

{machine}

Command (from the repository root):

```
{command}
```

**Names read off tiles** (held-out synthetic galleries: 25 people and 25 display names the tests never use,
with accents, apostrophes and hyphens; typefaces DejaVu Sans Bold, DejaVu Serif and DejaVu Sans Condensed,
none of which the OCR's constants were chosen on; plates as the tile's height / 16, at least 11 px; three
frames per cell, one per typeface). Each cell: names exact after NFC / tiles, and the median time of one OCR
reading of the whole frame (all its tiles, in one Tesseract run).

| style | {grid_header} |
|---|{"---|" * len(GRIDS)}
{name_rows}

In all: **{exact}/{total} names exact ({exact / total:.1%})**; {read} tiles named, {wrong} of them misspelt;
{total - read} tiles left unnamed ("Student N").

**The two OCR candidates** on the same cut-outs (plates and lines of text found by `vision/labels.py`), by grid
(all styles and typefaces): Tesseract 5 with its Latin-script model (Debian's `tesseract-ocr-script-latn`), and
PP-OCRv4's recogniser from the pinned `rapidocr-onnxruntime==1.4.4` wheel (taken from the archive, never
installed), CTC-decoded:

| grid | Tesseract (Latin): exact | right but for accents and case | PP-OCRv4: exact | right but for accents and case |
|---|---|---|---|---|
{grid_rows}

PP-OCRv4 read {paddle_exact}/{total} exactly. Its dictionary is Chinese and English, with only í, á, é and ü of the
Latin accents, so "Zoë", "Núñez" or "Łukasz" can never come out right; Tesseract is the reader ClassLens uses.
Tesseract's misreads (first 20):

{misread_lines}

**Finding the tiles** (`vision.gallery.find_tiles`, median of 20): {layout_costs} per sampled frame.
OCR runs only for tiles that hold a face and are new (or, for a tile no name could be read from, whose
label region changed, at most once per 10 s; or a named tile where the recogniser sees another person for
3 frames), in one Tesseract process per frame.

**Throughput of `analyze` at 1 fps** on two {seconds:g}-second 3×3 galleries of the same nine clips and
photos: `benchmarks/analyze.py`'s (tiles edge to edge, no names: not a gallery to the layout detection) and a
meeting's, drawn as Zoom draws it (8 px gutters, a name plate on each tile); and the meeting's at the long
length (one run each). Median of the runs; the ratio is against `--layout camera` on the same video. The
names are read once, when the tiles first appear (about a second of OCR), and again only after a layout
change; finding the tiles is repeated only when the page around them changed. What remains per frame is
tracking each tile as its own stream and the check that the page is unchanged.

| video, layout | wall time (s) | ratio | students |
|---|---|---|---|
{chr(10).join(throughput_rows)}

On the meeting gallery with `--layout auto`, {found} of the 9 names came out exactly (one tile, `no_face.mp4`,
never shows a face, so it is never read); the students were:
{", ".join(named)}. (Three tiles are photos of several people or of none, and some clips show
no face for a while, so not every tile is one student.)
{SECTION_END}
"""


if __name__ == "__main__":
    sys.exit(main())
