"""Who in a meeting may be analysed: the session's consent mode and its list of display names.

A participant on the opt-out list (or, in opt-in mode, not on the opt-in list) is never
subscribed to and never analysed. Names are compared the way people type them: case and
runs of whitespace do not matter, so "Ada  lovelace " matches "Ada Lovelace".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from kernel.store import ConsentMode


def normalise_name(display_name: str) -> str:
    """A display name as compared for consent: casefolded, whitespace runs collapsed, trimmed."""
    return " ".join(display_name.casefold().split())


@dataclass(frozen=True)
class ConsentPolicy:
    """The consent rule of one session: a mode and the display names its list holds."""

    mode: ConsentMode
    """Everyone, everyone except the listed names, or only the listed names."""
    names: tuple[str, ...] = ()
    """Display names on the opt-out or opt-in list, as given (normalised only for comparison)."""
    _normalised: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_normalised", frozenset(normalise_name(n) for n in self.names))

    @classmethod
    def everyone(cls) -> ConsentPolicy:
        """Every participant may be analysed."""
        return cls(ConsentMode.everyone)

    @classmethod
    def opt_out(cls, names: Iterable[str]) -> ConsentPolicy:
        """Everyone except ``names``."""
        return cls(ConsentMode.opt_out, tuple(names))

    @classmethod
    def opt_in(cls, names: Iterable[str]) -> ConsentPolicy:
        """Only ``names``."""
        return cls(ConsentMode.opt_in, tuple(names))

    @classmethod
    def from_store(cls, mode: ConsentMode | str, names_json: str) -> ConsentPolicy:
        """The policy recorded on an ``Analysis`` row (``consent_mode``, ``consent_names_json``)."""
        names = json.loads(names_json or "[]")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"consent_names_json: expected a JSON list of names, got {names_json!r}")
        return cls(ConsentMode(mode), tuple(names))

    def names_json(self) -> str:
        """The list as stored on the ``Analysis`` row."""
        return json.dumps(list(self.names), ensure_ascii=False)

    def allows(self, display_name: str) -> bool:
        """Whether the participant with this display name may be analysed."""
        if self.mode is ConsentMode.everyone:
            return True
        listed = normalise_name(display_name) in self._normalised
        return not listed if self.mode is ConsentMode.opt_out else listed
