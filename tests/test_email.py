"""The after-class email against a real SMTP server (aiosmtpd) that each test starts on a free port.

The class in the store is the generated one of tests/test_reports.py (five students,
one named like an XSS attempt); the server is real, and so are the MIME parsing, the
PNG decoding, the retries and the CLI.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import Engine
from typer.testing import CliRunner

from kernel.settings import Settings
from kernel.store import Analysis, EmailStatus, init_store, session_scope
from reports.delivery import deliver_after_session
from tests.test_reports import make_analysis

HOST = "teacher@school.example"
PUBLIC_URL = "https://archive.example.edu"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ScriptedHandler:
    """Answers DATA with the scripted replies first (e.g. two 451s), then accepts and keeps the message."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self.messages: list[bytes] = []
        self.recipients: list[list[str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802  aiosmtpd's hook name
        if self.replies:
            return self.replies.pop(0)
        self.messages.append(bytes(envelope.original_content or envelope.content))
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 Message accepted"


@pytest.fixture
def smtp() -> Iterator[tuple[ScriptedHandler, int]]:
    handler = ScriptedHandler()
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def store(tmp_path: Path) -> tuple[Engine, str]:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return init_store(url), url


def _settings(tmp_path: Path, url: str, port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": url,
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_security": "none",
        "smtp_from": "ClassLens <classlens@school.example>",
        "smtp_timeout_seconds": 5.0,
        "email_retry_attempts": 3,
        "email_retry_base_seconds": 0.01,
        "public_url": PUBLIC_URL,
    }
    values.update(overrides)
    return Settings(**values)


def _session(engine: Engine, host_email: str | None = HOST) -> int:
    analysis_id = make_analysis(engine)
    with session_scope(engine) as session:
        row = session.get(Analysis, analysis_id)
        assert row is not None
        row.host_email = host_email
    return analysis_id


def _row(engine: Engine, analysis_id: int) -> Analysis:
    with session_scope(engine) as session:
        row = session.get(Analysis, analysis_id)
        assert row is not None
        return row


def _parse(raw: bytes) -> EmailMessage:
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_the_email_is_html_with_inline_png_charts_and_a_text_alternative(
    tmp_path: Path, store: tuple[Engine, str], smtp: tuple[ScriptedHandler, int]
) -> None:
    engine, url = store
    handler, port = smtp
    analysis_id = _session(engine)
    result = deliver_after_session(_settings(tmp_path, url, port), engine, analysis_id)
    assert result.email_status is EmailStatus.sent and result.attempts == 1
    assert len(handler.messages) == 1 and handler.recipients == [[HOST]]
    message = _parse(handler.messages[0])
    assert message["To"] == HOST and "Linear algebra, week 3" in message["Subject"]

    assert message.get_content_type() == "multipart/alternative"
    plain, related = list(message.iter_parts())
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html_part, *images = list(related.iter_parts())
    assert html_part.get_content_type() == "text/html"
    assert len(images) == 2 and all(i.get_content_type() == "image/png" for i in images)

    html = html_part.get_content()
    cids = re.findall(r'src="cid:([^"]+)"', html)
    by_cid = {str(i["Content-ID"]).strip().strip("<>"): i for i in images}
    assert sorted(cids) == sorted(by_cid), "every cid: in the HTML has exactly its image part"
    for part in images:
        png = part.get_content()
        assert isinstance(png, bytes) and png.startswith(b"\x89PNG\r\n\x1a\n")
        picture = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_COLOR)
        assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 400
    assert re.search(r'<img [^>]*alt="Class engagement over time[^"]+"', html)

    # Per-student summary with links into the archive; the XSS name is text.
    assert f'href="{PUBLIC_URL}/sessions/{analysis_id}/students/1-student-1.html"' in html
    assert f'href="{PUBLIC_URL}/sessions/{analysis_id}/"' in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "0:20–0:30" in html and "heuristic baseline" in html
    text = plain.get_content()
    assert "Student 5" in text and f"{PUBLIC_URL}/sessions/{analysis_id}/" in text

    row = _row(engine, analysis_id)
    assert row.email_status == EmailStatus.sent and row.emailed_at is not None and row.email_detail is None
    assert result.report.overview.is_file() and row.report_path == str(result.report.folder)


def test_the_email_hides_student_rows_below_the_threshold(
    tmp_path: Path, store: tuple[Engine, str], smtp: tuple[ScriptedHandler, int]
) -> None:
    engine, url = store
    handler, port = smtp
    analysis_id = _session(engine)
    settings = _settings(tmp_path, url, port, min_students_for_class_rows=6)
    deliver_after_session(settings, engine, analysis_id)
    message = _parse(handler.messages[0])
    _plain, related = list(message.iter_parts())
    html_part, *images = list(related.iter_parts())
    html = html_part.get_content()
    assert len(images) == 1  # the class curve only: the heatmap has a row per student
    assert "only 5 students were analysed" in html and "students/1-student-1.html" not in html
    assert "Student 5" not in html


def test_transient_refusals_are_retried_with_backoff_until_accepted(
    tmp_path: Path, store: tuple[Engine, str], smtp: tuple[ScriptedHandler, int]
) -> None:
    engine, url = store
    handler, port = smtp
    handler.replies = ["451 4.3.0 Try again later", "451 4.3.0 Try again later"]
    analysis_id = _session(engine)
    waits: list[float] = []
    result = deliver_after_session(_settings(tmp_path, url, port), engine, analysis_id, sleep=waits.append)
    assert result.email_status is EmailStatus.sent and result.attempts == 3
    assert waits == [pytest.approx(0.01), pytest.approx(0.02)]
    assert len(handler.messages) == 1
    assert _row(engine, analysis_id).email_status == EmailStatus.sent


def test_a_permanent_refusal_is_recorded_with_the_server_reason_and_the_report_stays(
    tmp_path: Path, store: tuple[Engine, str], smtp: tuple[ScriptedHandler, int]
) -> None:
    engine, url = store
    handler, port = smtp
    handler.replies = ["550 5.7.1 Relaying denied for this sender"]
    analysis_id = _session(engine)
    waits: list[float] = []
    result = deliver_after_session(_settings(tmp_path, url, port), engine, analysis_id, sleep=waits.append)
    assert result.email_status is EmailStatus.failed and result.attempts == 1 and waits == []
    assert result.email_detail == "550 5.7.1 Relaying denied for this sender"
    row = _row(engine, analysis_id)
    assert row.email_status == EmailStatus.failed and row.email_detail == result.email_detail
    assert row.emailed_at is None
    assert result.report.overview.is_file() and all(p.is_file() for p in result.report.students)
    assert not handler.messages


def test_an_unreachable_server_is_retried_then_recorded_as_failed(
    tmp_path: Path, store: tuple[Engine, str]
) -> None:
    engine, url = store
    analysis_id = _session(engine)
    waits: list[float] = []
    settings = _settings(tmp_path, url, _free_port(), email_retry_attempts=2)
    result = deliver_after_session(settings, engine, analysis_id, sleep=waits.append)
    assert result.email_status is EmailStatus.failed and result.attempts == 2 and len(waits) == 1
    assert "cannot talk to the mail server" in (result.email_detail or "")
    assert result.report.overview.is_file()


def test_without_smtp_or_host_no_email_is_sent_but_the_report_is(
    tmp_path: Path, store: tuple[Engine, str]
) -> None:
    engine, url = store
    analysis_id = _session(engine)
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    result = deliver_after_session(settings, engine, analysis_id)
    assert result.email_status is EmailStatus.not_sent and "smtp_host" in (result.email_detail or "")
    assert result.report.overview.is_file()
    assert _row(engine, analysis_id).email_status == EmailStatus.not_sent


def test_the_cli_resends_and_exits_1_with_one_line_when_refused(
    tmp_path: Path, store: tuple[Engine, str], smtp: tuple[ScriptedHandler, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from classlens.cli import app

    engine, url = store
    handler, port = smtp
    analysis_id = _session(engine)
    for key in [k for k in os.environ if k.startswith("CLASSLENS_") and not k.startswith("CLASSLENS_TEST_")]:
        monkeypatch.delenv(key)
    env = {
        "CLASSLENS_DATA_DIR": str(tmp_path / "data"),
        "CLASSLENS_DATABASE_URL": url,
        "CLASSLENS_SMTP_HOST": "127.0.0.1",
        "CLASSLENS_SMTP_PORT": str(port),
        "CLASSLENS_SMTP_SECURITY": "none",
        "CLASSLENS_EMAIL_RETRY_ATTEMPTS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    out = tmp_path / "report"

    handler.replies = ["554 5.7.1 Message rejected as spam"]
    refused = runner.invoke(app, ["report", str(analysis_id), "--out", str(out), "--email"])
    assert refused.exit_code == 1, refused.output
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "554 5.7.1 Message rejected as spam" in errors[0]
    assert (out / "index.html").is_file()
    assert _row(engine, analysis_id).email_status == EmailStatus.failed

    resent = runner.invoke(app, ["report", str(analysis_id), "--out", str(out), "--to", "head@school.example"])
    assert resent.exit_code == 0, resent.output
    assert handler.recipients == [["head@school.example"]]
    assert _row(engine, analysis_id).email_status == EmailStatus.sent
