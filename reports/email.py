"""The after-class email: build the MIME message, send it over SMTP, retry, record the outcome.

The message is ``multipart/alternative``: a ``text/plain`` part for clients that show
no HTML, then a ``multipart/related`` part holding the HTML and the PNG charts it
shows through ``cid:`` references (common mail clients drop SVG and block remote
images, so the charts travel inside the message). Links point at the archive under
the ``public_url`` setting.

Delivery retries transient failures (the server unreachable or timing out, a 4xx
answer) with exponential backoff and stops at a permanent one (a 5xx answer, a TLS
or login problem that retrying cannot fix). The outcome, with the server's own words
when it refused, is recorded on the session (``Analysis.email_status``,
``email_detail``, ``emailed_at``).
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Literal

from sqlalchemy import Engine

from kernel.errors import ClassLensError, ConfigurationError
from kernel.store import Analysis, EmailStatus, session_scope, utcnow
from reports.aggregate import ReportData
from reports.formatting import format_score, format_share, format_timestamp, score_level_name
from reports.png_charts import PngChart, class_curve_png, heatmap_png
from reports.render import MAX_LISTED_DIPS, STUDENTS_DIR, ReportOptions, template_environment

if TYPE_CHECKING:
    from kernel.settings import Settings

logger = logging.getLogger(__name__)

#: Longest server answer kept in ``Analysis.email_detail``.
MAX_DETAIL_CHARS = 500


class MailRefusedError(ClassLensError):
    """The mail server refused the message for good, or could not be reached after every retry."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """How to reach the mail server; built from the settings."""

    host: str
    """SMTP server name or address."""
    port: int
    """TCP port."""
    security: Literal["none", "starttls", "tls"]
    """Plain, upgraded with STARTTLS, or TLS from the first byte."""
    user: str | None
    """Login name, or None for no login."""
    password: str | None
    """Password for ``user``."""
    sender: str
    """The From address."""
    timeout_seconds: float
    """Timeout of the connection and of each command."""
    retry_attempts: int
    """Attempts in all for transient failures."""
    retry_base_seconds: float
    """Wait before the second attempt; doubles for each later one."""

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpConfig | None:
        """The configured server, or None when email is switched off (no ``smtp_host``)."""
        if not settings.smtp_host:
            return None
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            user=settings.smtp_user,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            sender=settings.smtp_from,
            timeout_seconds=settings.smtp_timeout_seconds,
            retry_attempts=settings.email_retry_attempts,
            retry_base_seconds=settings.email_retry_base_seconds,
        )


@dataclass(frozen=True, slots=True)
class InlineImage:
    """A chart inside the message, referenced from the HTML as ``cid:<cid>``."""

    name: str
    """The chart's short name (``class-curve``, ``heatmap``)."""
    cid: str
    """Content id without angle brackets."""
    png: bytes
    """The PNG bytes."""
    alt: str
    """Alt text of the ``<img>``."""


@dataclass(frozen=True, slots=True)
class SendResult:
    """What happened when the message was sent."""

    sent: bool
    """Whether the server accepted the message."""
    attempts: int
    """Attempts made."""
    detail: str | None
    """The last failure in one line (the server's code and answer when it gave one); None when sent."""
    permanent: bool
    """Whether the last failure was permanent (not retried)."""


class _AttemptError(Exception):
    """One failed attempt, classified."""

    def __init__(self, detail: str, *, permanent: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.permanent = permanent


def _one_line(text: str) -> str:
    """Collapse whitespace (and header-breaking line ends) into single spaces."""
    return " ".join(text.split())


def archive_session_url(public_url: str | None, analysis_id: int, document: str = "") -> str | None:
    """The archive address of a session's report (or of one file of it), or None without ``public_url``."""
    if not public_url:
        return None
    return f"{public_url.rstrip('/')}/sessions/{analysis_id}/{document}"


def parse_recipient(address: str) -> Address:
    """Validate a recipient address; a bad one is a configuration error that names it."""
    try:
        parsed = Address(addr_spec=address.strip())
    except (ValueError, IndexError) as exc:
        raise ConfigurationError(f"not an email address: {address!r} ({exc})") from None
    if not parsed.username or not parsed.domain:
        raise ConfigurationError(f"not an email address: {address!r}")
    return parsed


def email_charts(data: ReportData, options: ReportOptions) -> tuple[PngChart, ...]:
    """The PNG charts the email shows: the class curve, and the heatmap when rows are shown."""
    if data.analysis.failed or not data.overview.timestamps:
        return ()
    charts = [class_curve_png(data.overview)]
    if data.students and not options.class_rows_hidden(data):
        charts.append(heatmap_png(data.overview))
    return tuple(charts)


def _plain_text(
    data: ReportData,
    options: ReportOptions,
    archive_url: str | None,
    report_folder: str,
    dips: Sequence[str],
) -> str:
    """The text/plain alternative: the same facts as the HTML, without charts."""
    analysis = data.analysis
    lines = [
        f"ClassLens class report: {analysis.display_title}",
        f"{analysis.created_at:%Y-%m-%d %H:%M} UTC, {format_timestamp(analysis.duration_seconds)} of class time, "
        f"{len(data.students)} student(s)" + (f", course {analysis.course}" if analysis.course else ""),
        f"Consent mode: {analysis.consent_description}.",
        "",
    ]
    if analysis.failed:
        lines.append(f"This analysis failed. Reason: {analysis.failure_reason or 'no reason was recorded'}")
    else:
        if data.engagement_is_heuristic:
            lines.append(
                "Engagement comes from a heuristic baseline that was not trained on engagement data; "
                "read the levels as rough indications."
            )
        if not data.emotion_enabled:
            lines.append("Emotion inference was off: engagement and attention cues only.")
        mean = data.overview.mean_engagement
        lines += [
            f"Class mean engagement: {format_score(mean, 2)} ({score_level_name(mean)}) on a 0-3 scale",
            f"Students visible on average: {format_share(data.overview.mean_share_visible)}",
            f"Disengagement moments: {len(data.overview.disengagement_intervals)}",
            *(f"  - {dip}" for dip in dips),
            "",
            "Students:",
        ]
        if options.class_rows_hidden(data):
            lines.append(options.class_rows_hidden_note(data))
        elif not data.summaries:
            lines.append("No student was tracked in this class.")
        for summary in () if options.class_rows_hidden(data) else data.summaries:
            parts = [
                f"- {summary.label}: engagement {format_score(summary.mean_engagement, 2)}"
                + (f" ± {format_score(summary.uncertainty, 2)}" if summary.uncertainty is not None else ""),
                f"visible {format_share(summary.visible_share)}",
            ]
            if data.emotion_enabled:
                parts.append(f"dominant emotion {summary.dominant_emotion or '–'}")
            parts.append(f"looking away {format_share(summary.cues.looking_away_share)}")
            lines.append(", ".join(parts))
    lines.append("")
    if archive_url:
        lines.append(f"Full report: {archive_url}")
    else:
        lines.append(f"The full report is in the report folder {report_folder} on the ClassLens server.")
    lines += [
        "",
        "All figures are estimates from facial cues with their uncertainty; no image of any face was stored.",
    ]
    return "\n".join(lines) + "\n"


def build_report_email(
    data: ReportData,
    *,
    sender: str,
    recipient: str,
    options: ReportOptions | None = None,
    public_url: str | None = None,
    report_folder: str = "",
) -> EmailMessage:
    """The after-class email for one session: overview inline, per-student summary, archive links."""
    options = options or ReportOptions()
    analysis = data.analysis
    to = parse_recipient(recipient)
    domain = to.domain or "classlens.invalid"
    images = [
        InlineImage(name=chart.name, cid=make_msgid(chart.name, domain)[1:-1], png=chart.png, alt=chart.alt)
        for chart in email_charts(data, options)
    ]
    intervals = data.overview.disengagement_intervals
    longest = sorted(intervals, key=lambda iv: (-iv.duration, iv.start))[:MAX_LISTED_DIPS]
    dips = sorted(longest, key=lambda iv: iv.start)
    rows_hidden = options.class_rows_hidden(data)
    student_rows = [
        {
            "summary": summary,
            "url": archive_session_url(public_url, analysis.id, f"{STUDENTS_DIR}/{summary.student.file_name}"),
        }
        for summary in data.summaries
        if not rows_hidden
    ]
    archive_url = archive_session_url(public_url, analysis.id)
    subject = _one_line(f"ClassLens report: {analysis.display_title}")
    html = (
        template_environment()
        .get_template("email.html")
        .render(
            subject=subject,
            data=data,
            images=images,
            dips=dips,
            rows_hidden=rows_hidden,
            rows_hidden_note=options.class_rows_hidden_note(data) if rows_hidden else "",
            student_rows=student_rows,
            archive_url=archive_url,
            report_folder=report_folder,
        )
    )
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = to
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid("classlens", domain)
    message.set_content(
        _plain_text(data, options, archive_url, report_folder, [f"{iv.label}" for iv in dips])
    )
    message.add_alternative(html, subtype="html")
    html_part = next(part for part in message.iter_parts() if part.get_content_type() == "text/html")
    for image in images:
        html_part.add_related(
            image.png,
            maintype="image",
            subtype="png",
            cid=f"<{image.cid}>",
            filename=f"{image.name}.png",
            disposition="inline",
        )
    return message


def _smtp_failure(exc: BaseException) -> _AttemptError:
    """Classify an exception of one attempt: 4xx and connection trouble are transient, the rest permanent."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        answers = list(exc.recipients.values())
        code, text = answers[0] if answers else (550, b"all recipients refused")
        return _server_answer(code, text)
    if isinstance(exc, smtplib.SMTPResponseException):
        return _server_answer(exc.smtp_code, exc.smtp_error)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return _AttemptError(f"the mail server does not support it: {_one_line(str(exc))}", permanent=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _AttemptError(f"TLS certificate not trusted: {_one_line(str(exc))}", permanent=True)
    if isinstance(exc, smtplib.SMTPServerDisconnected | OSError):
        return _AttemptError(
            f"cannot talk to the mail server: {_one_line(str(exc)) or type(exc).__name__}", permanent=False
        )
    return _AttemptError(f"{type(exc).__name__}: {_one_line(str(exc))}", permanent=True)


def _server_answer(code: int, text: bytes | str) -> _AttemptError:
    """A failure carrying the server's own code and words."""
    words = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    detail = f"{code} {_one_line(words)}"[:MAX_DETAIL_CHARS]
    # 4xx is the server's "try again later"; anything else will not change by retrying.
    return _AttemptError(detail, permanent=not 400 <= code < 500)


def send_once(message: EmailMessage, config: SmtpConfig) -> None:
    """One delivery attempt; raises :class:`_AttemptError` (classified) on any failure."""
    context = ssl.create_default_context()
    try:
        client: smtplib.SMTP
        if config.security == "tls":
            client = smtplib.SMTP_SSL(config.host, config.port, timeout=config.timeout_seconds, context=context)
        else:
            client = smtplib.SMTP(config.host, config.port, timeout=config.timeout_seconds)
        with client:
            client.ehlo()
            if config.security == "starttls":
                client.starttls(context=context)
                client.ehlo()
            if config.user:
                client.login(config.user, config.password or "")
            client.send_message(message)
    except _AttemptError:
        raise
    except (smtplib.SMTPException, OSError) as exc:
        raise _smtp_failure(exc) from exc


def send_with_retries(
    message: EmailMessage,
    config: SmtpConfig,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> SendResult:
    """Send, retrying transient failures with exponential backoff; never raises for a mail failure."""
    last: _AttemptError | None = None
    for attempt in range(1, config.retry_attempts + 1):
        try:
            send_once(message, config)
            return SendResult(sent=True, attempts=attempt, detail=None, permanent=False)
        except _AttemptError as failure:
            last = failure
            logger.warning("email attempt %d of %d failed: %s", attempt, config.retry_attempts, failure.detail)
            if failure.permanent or attempt == config.retry_attempts:
                return SendResult(sent=False, attempts=attempt, detail=failure.detail, permanent=failure.permanent)
            sleep(config.retry_base_seconds * 2 ** (attempt - 1))
    assert last is not None  # retry_attempts >= 1 is enforced by the settings
    return SendResult(sent=False, attempts=config.retry_attempts, detail=last.detail, permanent=last.permanent)


def record_email_status(engine: Engine, analysis_id: int, status: EmailStatus, detail: str | None) -> None:
    """Write the delivery state onto the session (``emailed_at`` only when it was sent)."""
    with session_scope(engine) as session:
        row = session.get(Analysis, analysis_id)
        if row is None:
            return
        row.email_status = status
        row.email_detail = detail[:MAX_DETAIL_CHARS] if detail else None
        if status is EmailStatus.sent:
            row.emailed_at = utcnow()
