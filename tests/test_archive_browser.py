"""The archive in a real headless Chromium: sign in, list, filter, read reports, export, delete, and the 404s.

uvicorn serves the app on an ephemeral port in a background thread; Playwright drives
Debian's ``chromium``. Full-page screenshots of every main page go to
``build/screenshots/``; with ``CLASSLENS_TEST_UPDATE_DOCS_SCREENSHOTS=1`` the session
list, a class overview and a student report are also copied to ``docs/screenshots/``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from classlens.analysis import analyze_recording
from kernel.store import Analysis, User, session_scope
from tests.conftest import CHROMIUM_BINARY, REPO_ROOT
from tests.processes import serve_in_thread
from tests.test_archive_http import PASSWORD, ArchiveWorld, build_archive_world
from vision.synthetic import demo_classroom_video

pytestmark = [pytest.mark.media, pytest.mark.browser]

SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
DOCS_SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
CLASS_TITLE = "Physics, week 5: forces"
#: Height (pixels) of the screenshots copied to docs/.
DOCS_HEIGHT = 1500


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, components: Any, default_models: Path) -> ArchiveWorld:
    world = build_archive_world(tmp_path_factory.mktemp("archive-browser"), components, default_models)
    # A class with several students, so the overview and the screenshots show a real class.
    outcome = analyze_recording(demo_classroom_video(seconds=12), world.settings.model_copy(update={"sample_fps": 2.0}),
                                out_dir=world.root / "reports" / "physics", components=components, title=CLASS_TITLE)
    with session_scope(world.engine) as session:
        analysis = session.get(Analysis, outcome.analysis_id)
        ada = session.exec(select(User).where(User.email == world.teacher_a)).one()
        assert analysis is not None
        analysis.course, analysis.owner_id = "Physics 10", ada.id
        session.add(analysis)
    world.sessions["physics"] = outcome.analysis_id
    return world


@pytest.fixture(scope="module")
def base_url(world: ArchiveWorld) -> Iterator[str]:
    """The app on uvicorn, on a port the OS picked, in a background thread."""
    with serve_in_thread(world.app()) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM_BINARY, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def _context(browser: Any, base_url: str) -> Any:
    return browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 860}, accept_downloads=True)


def _shot(page: Any, name: str, *, for_docs: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if for_docs and os.environ.get("CLASSLENS_TEST_UPDATE_DOCS_SCREENSHOTS"):
        # The docs get the top of the page only: what a teacher sees first, at a size a repository can carry.
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        height = min(DOCS_HEIGHT, page.evaluate("document.documentElement.scrollHeight"))
        page.screenshot(path=str(DOCS_SCREENSHOTS / path.name), full_page=True,
                        clip={"x": 0, "y": 0, "width": 1280, "height": height})


def _sign_in(page: Any, email: str, screenshot: str | None = None) -> None:
    page.goto("/sessions")
    assert "/login" in page.url  # pages need a session
    if screenshot:
        _shot(page, screenshot)
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/sessions")


def test_teacher_signs_in_filters_and_reads_reports(browser: Any, base_url: str, world: ArchiveWorld) -> None:
    context = _context(browser, base_url)
    page = context.new_page()
    try:
        _sign_in(page, world.teacher_a, screenshot="login")
        rows = page.locator("table.sessions tbody tr")
        assert rows.count() == 4  # Ada's four sessions, nobody else's
        assert page.get_by_text("Cells and tissues").count() == 0
        _shot(page, "sessions", for_docs=True)

        page.get_by_label("Course").select_option("Maths 8A")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url("**course=Maths+8A**")
        assert rows.count() == 1 and "Statistics, week 1" in rows.first.inner_text()
        page.get_by_label("Search").fill("no such class")
        page.get_by_role("button", name="Filter").click()
        page.get_by_text("No session matches these filters").wait_for()
        _shot(page, "sessions-empty-filter")
        page.get_by_role("link", name="Clear", exact=True).click()

        page.get_by_role("link", name=CLASS_TITLE).click()
        page.wait_for_url(f"**/sessions/{world.sessions['physics']}/")
        assert page.locator("h1").first.inner_text().strip() == CLASS_TITLE
        page.locator("svg").first.wait_for()
        _shot(page, "class-overview", for_docs=True)

        student_link = page.locator("nav.clx-students a").first
        label = student_link.inner_text()
        student_link.click()
        page.wait_for_url("**/students/*.html")
        assert label in page.locator("h1").first.inner_text()
        _shot(page, "student-report", for_docs=True)
        page.locator("nav.clx-bar").get_by_role("link", name="Class overview").click()
        page.wait_for_url(f"**/sessions/{world.sessions['physics']}/")
    finally:
        context.close()


def test_csv_export_downloads_every_student(browser: Any, base_url: str, world: ArchiveWorld) -> None:
    context = _context(browser, base_url)
    page = context.new_page()
    try:
        _sign_in(page, world.teacher_a)
        page.goto(f"/sessions/{world.sessions['physics']}/")
        with page.expect_download() as download_info:
            page.get_by_role("link", name="Download CSV").click()
        download = download_info.value
        assert download.suggested_filename == f"classlens-session-{world.sessions['physics']}-timelines.csv"
        rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text(encoding="utf-8"))))
        labels = {row["student_label"] for row in rows}
        assert len(labels) >= 5 and {row["analysis_id"] for row in rows} == {str(world.sessions["physics"])}
    finally:
        context.close()


def test_delete_asks_first_then_removes_the_session(browser: Any, base_url: str, world: ArchiveWorld) -> None:
    context = _context(browser, base_url)
    page = context.new_page()
    doomed = world.sessions["doomed"]
    try:
        _sign_in(page, world.teacher_a)
        page.locator("tr", has_text="Statistics, week 1").get_by_role("link", name="Delete…").click()
        page.wait_for_url(f"**/sessions/{doomed}/delete")
        page.get_by_text("This cannot be undone").wait_for()
        _shot(page, "confirm-delete")
        page.get_by_role("link", name="Keep it").click()  # changing one's mind keeps everything
        page.wait_for_url(f"**/sessions/{doomed}/")
        page.goto(f"/sessions/{doomed}/delete")
        page.get_by_role("button", name="Delete session and all its data").click()
        page.wait_for_url(f"**/sessions?deleted={doomed}")
        page.get_by_text("and all its data were deleted").wait_for()
        assert page.get_by_text("Statistics, week 1").count() == 0
        _shot(page, "after-delete")
        response = page.goto(f"/sessions/{doomed}/")
        assert response is not None and response.status == 404
    finally:
        context.close()
    with session_scope(world.engine) as session:
        assert session.get(Analysis, doomed) is None


def test_another_teachers_report_is_not_found(browser: Any, base_url: str, world: ArchiveWorld) -> None:
    context = _context(browser, base_url)
    page = context.new_page()
    try:
        _sign_in(page, world.teacher_b)
        for route in (f"/sessions/{world.sessions['physics']}/", f"/sessions/{world.sessions['algebra']}/timelines.csv",
                      f"/sessions/{world.sessions['algebra']}/delete"):
            response = page.goto(route)
            assert response is not None and response.status == 404, route
            assert "Not found" in page.locator("h1").inner_text()
            assert CLASS_TITLE not in page.content()
        _shot(page, "not-found")
    finally:
        context.close()


def test_admin_reads_the_audit_log(browser: Any, base_url: str, world: ArchiveWorld) -> None:
    context = _context(browser, base_url)
    page = context.new_page()
    try:
        _sign_in(page, world.admin)
        assert page.get_by_text("Cells and tissues").count() == 1  # admins see every teacher's sessions
        # Every row's actions are on screen at 1280 px, with the Teacher column and a failure reason shown.
        for link in page.locator("td.actions a").all():
            box = link.bounding_box()
            assert box is not None and box["x"] + box["width"] <= 1280, (link.inner_text(), box)
        failed_row = page.locator("table.sessions tbody tr", has_text="Lost recording")
        assert failed_row.locator("td.actions").get_by_text("CSV").count() == 0  # a failed session has no data
        _shot(page, "sessions-admin")
        page.get_by_role("link", name="Audit log").click()
        page.wait_for_url("**/admin/audit")
        table = page.locator("table")
        assert world.teacher_a in table.inner_text() and "viewed" in table.inner_text()
        _shot(page, "audit-log")
        page.get_by_role("link", name="Users").click()
        page.wait_for_url("**/admin/users")
        assert world.teacher_b in page.locator("table").inner_text()
        _shot(page, "users")
    finally:
        context.close()
