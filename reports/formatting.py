"""Small, pure formatting helpers shared by the aggregation, the charts and the templates.

Everything a teacher reads goes through these, so a time or a percentage looks the
same in a table, in a chart's axis and in its alt text.
"""

from __future__ import annotations

import math
import re
import unicodedata

from kernel.types import ENGAGEMENT_LEVELS

#: Shown wherever a number is unknown (never seen, model did not run).
MISSING = "–"


def format_timestamp(seconds: float) -> str:
    """Class time as ``m:ss`` under an hour and ``h:mm:ss`` from an hour on.

    Seconds are floored, so a sample at 29.9 s reads ``0:29``, like a video player.
    A negative time reads ``0:00``; a non-finite one reads as missing.
    """
    if not math.isfinite(seconds):
        return MISSING
    # The epsilon absorbs float noise such as 29.999999999 for a sample meant at 30 s.
    whole = math.floor(max(0.0, seconds) + 1e-6)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def format_interval(start: float, end: float) -> str:
    """A span of class time, ``m:ss–m:ss``."""
    return f"{format_timestamp(start)}–{format_timestamp(end)}"


def format_share(share: float | None) -> str:
    """A share 0–1 as a whole percentage (``50%``), or the missing mark."""
    if share is None or not math.isfinite(share):
        return MISSING
    return f"{share * 100:.0f}%"


def format_score(score: float | None, digits: int = 1) -> str:
    """An engagement score on the 0–3 scale with a fixed number of decimals."""
    if score is None or not math.isfinite(score):
        return MISSING
    return f"{score:.{digits}f}"


def level_name(level: int | None) -> str:
    """The name of an engagement level 0–3 (``very low`` … ``very high``)."""
    if level is None or not 0 <= level < len(ENGAGEMENT_LEVELS):
        return MISSING
    return ENGAGEMENT_LEVELS[level]


def score_level_name(score: float | None) -> str:
    """The level name nearest to an expected-level score (1.6 reads ``high``)."""
    if score is None or not math.isfinite(score):
        return MISSING
    return level_name(min(len(ENGAGEMENT_LEVELS) - 1, max(0, math.floor(score + 0.5))))


def slugify(text: str, fallback: str = "student", max_length: int = 40) -> str:
    """A lowercase ASCII file-name part: letters, digits and single hyphens.

    Meeting display names can hold anything (markup, slashes, emoji); the slug must
    be safe as a path component on every file system and in a URL.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:max_length].rstrip("-")
    return slug or fallback
