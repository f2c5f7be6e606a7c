"""Which Janus servers a teacher may send the bot to: no detour into the server's own network.

The invite API makes the server connect to a URL a teacher typed. Unchecked, that lets any
teacher reach what only the server can reach: its loopback (Redis, the database), the
private network, a cloud's metadata address. So before anything is created:

* with ``janus_allowed_urls`` set by an admin, the URL must be one of them (loopback and
  private servers are fine there: the admin chose them);
* without it, the host is resolved and every address must be a public unicast address
  (not loopback, private, link-local, shared, multicast, unspecified or reserved). The bot
  then connects to the address that was checked, so a DNS answer that changes between the
  check and the connection (DNS rebinding) cannot take it elsewhere.

Credentials in the URL (``user:pass@``) are refused: they would end up in the stored
session and in API answers.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from kernel.errors import BadInputError


class JanusUrlRefusedError(BadInputError):
    """The invite names a Janus URL the server will not connect to."""


@dataclass(frozen=True)
class CheckedJanusUrl:
    """A Janus URL the bot may use, and the address to connect to when it was pinned."""

    url: str
    """The URL as given, without a trailing slash."""
    pinned_address: str | None
    """The checked IP address the bot connects to; None for an admin-allowed URL (resolved normally)."""


def normalise_janus_url(url: str) -> str:
    """The form URLs are compared in: scheme and host in lower case, no trailing slash."""
    parts = urlsplit(url.strip())
    return parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl().rstrip("/")


def is_public_address(address: str) -> bool:
    """Whether an IP address is public unicast (an IPv4-mapped IPv6 address is judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_janus_url(url: str, allowed_urls: Sequence[str]) -> CheckedJanusUrl:
    """The checked URL, or :class:`JanusUrlRefusedError` with a reason a teacher can act on.

    Resolves the host (blocking: call it in a thread from async code).
    """
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise JanusUrlRefusedError("janus_url must be an http:// or https:// URL of the Janus API")
    if parts.username is not None or parts.password is not None:
        raise JanusUrlRefusedError("janus_url must not contain a user name or password")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise JanusUrlRefusedError("janus_url has an invalid port") from None
    cleaned = url.strip().rstrip("/")
    if allowed_urls:
        if normalise_janus_url(url) not in {normalise_janus_url(allowed) for allowed in allowed_urls}:
            raise JanusUrlRefusedError("this server only joins meetings on the Janus servers its admin allowed "
                                       "(janus_allowed_urls); ask them to add yours")
        return CheckedJanusUrl(cleaned, None)
    try:
        answers = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise JanusUrlRefusedError(f"janus_url: the host {parts.hostname!r} cannot be resolved") from None
    addresses = list(dict.fromkeys(str(answer[4][0]) for answer in answers))
    if not addresses or not all(is_public_address(address) for address in addresses):
        raise JanusUrlRefusedError("janus_url must be a public address; Janus servers on a private network "
                                   "need an admin to list them in janus_allowed_urls")
    return CheckedJanusUrl(cleaned, addresses[0])
