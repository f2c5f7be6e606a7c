"""After a session is finalised: render its report folder, then email the host.

The report is written first and recorded on the session, so a mail server that is
down, slow or refusing never costs the report: the failure is recorded on the session
(``email_status=failed`` with the server's reason) and ``classlens report SESSION
--email`` sends it again later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from kernel.errors import ClassLensError
from kernel.store import Analysis, EmailStatus, session_scope
from reports.aggregate import AnalysisNotFoundError, build_report_data
from reports.render import ReportOptions, ReportPaths, render_documents, report_paths, write_documents

if TYPE_CHECKING:
    from kernel.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """Where the report went and what happened to the email."""

    analysis_id: int
    """The session."""
    report: ReportPaths
    """The rendered report folder and its files."""
    email_status: EmailStatus
    """The session's email state after this call."""
    email_detail: str | None
    """Why the email was not sent (the server's answer, or what is not configured); None when sent."""
    recipient: str | None
    """Who the email was for, when there was someone to send it to."""
    attempts: int
    """Delivery attempts made by this call (0 when nothing was sent)."""

    @property
    def refused(self) -> bool:
        """Whether this call tried to send and the mail could not be delivered."""
        return self.attempts > 0 and self.email_status is EmailStatus.failed


def report_folder_for(settings: Settings, row: Analysis) -> Path:
    """The session's report folder: where it was rendered before, else ``reports_dir/analysis-<id>``."""
    if row.report_path:
        return Path(row.report_path)
    return settings.resolved_reports_dir / f"analysis-{row.id}"


def deliver_after_session(
    settings: Settings,
    engine: Engine,
    analysis_id: int,
    *,
    out_dir: Path | None = None,
    send_email: bool = True,
    recipient: str | None = None,
    resend: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryResult:
    """Render the session's reports, then email the host when an address and SMTP are configured.

    ``recipient`` overrides the session's ``host_email``. A session already emailed is
    not emailed again unless ``resend`` is set, so finalising twice sends one email.
    Rendering errors propagate (nothing was written); mail errors never do: they are
    recorded on the session and returned.
    """
    from reports.email import (
        SmtpConfig,
        build_report_email,
        record_email_status,
        send_with_retries,
    )

    options = ReportOptions.from_settings(settings)
    with session_scope(engine) as session:
        row = session.get(Analysis, analysis_id)
        if row is None:
            raise AnalysisNotFoundError(f"analysis {analysis_id} is not in the store")
        folder = (out_dir or report_folder_for(settings, row)).absolute()
        data = build_report_data(session, analysis_id)
        host_email = row.host_email
        status, detail = EmailStatus(row.email_status), row.email_detail
    write_documents(render_documents(data, options), folder, analysis_id)
    with session_scope(engine) as session:
        stored = session.get(Analysis, analysis_id)
        if stored is not None:
            stored.report_path = str(folder)
    paths = report_paths(data, folder)

    def result(status: EmailStatus, detail: str | None, to: str | None, attempts: int = 0) -> DeliveryResult:
        return DeliveryResult(analysis_id, paths, status, detail, to, attempts)

    to = recipient or host_email
    if not send_email:
        return result(status, detail, to)
    if status is EmailStatus.sent and not resend:
        return result(status, detail, to)
    if not to:
        return result(status, "the session has no host email address", None)
    config = SmtpConfig.from_settings(settings)
    if config is None:
        reason = "email is not configured (smtp_host is unset)"
        record_email_status(engine, analysis_id, EmailStatus.not_sent, reason)
        return result(EmailStatus.not_sent, reason, to)
    record_email_status(engine, analysis_id, EmailStatus.pending, None)
    try:
        message = build_report_email(
            data,
            sender=config.sender,
            recipient=to,
            options=options,
            public_url=settings.public_url,
            report_folder=str(folder),
        )
    except ClassLensError as exc:
        # A bad address: the report stays, the session says why no email went out.
        record_email_status(engine, analysis_id, EmailStatus.failed, str(exc))
        return result(EmailStatus.failed, str(exc), to, attempts=1)
    except Exception as exc:
        # A bug while building the message must not leave the session "pending" forever.
        record_email_status(engine, analysis_id, EmailStatus.failed, f"could not build the email: {exc}")
        raise
    sent = send_with_retries(message, config, sleep=sleep)
    if sent.sent:
        record_email_status(engine, analysis_id, EmailStatus.sent, None)
        logger.info("report of session %d emailed to %s after %d attempt(s)", analysis_id, to, sent.attempts)
        return result(EmailStatus.sent, None, to, sent.attempts)
    record_email_status(engine, analysis_id, EmailStatus.failed, sent.detail)
    logger.warning("report of session %d could not be emailed to %s: %s", analysis_id, to, sent.detail)
    return result(EmailStatus.failed, sent.detail, to, sent.attempts)
