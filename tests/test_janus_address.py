"""The invite API's check of janus_url: no detour into the server's own network (SSRF)."""

from __future__ import annotations

import pytest

from bot.janus_address import JanusUrlRefusedError, check_janus_url


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",  # a cloud's metadata service
    "http://127.0.0.1:6379/",  # Redis on the server itself
    "http://[::1]:8088/janus",
    "http://[::ffff:127.0.0.1]/janus",  # loopback written as IPv4-mapped IPv6
    "http://0/janus",  # the unspecified address
    "http://10.0.0.5:8088/janus",
    "http://192.168.1.20/janus",
    "http://100.64.0.1/janus",  # shared address space (carrier NAT)
    "http://224.0.0.1/janus",  # multicast
    "http://localhost:8088/janus",  # a name that resolves to loopback
])
def test_non_public_addresses_are_refused_without_an_allowlist(url: str) -> None:
    with pytest.raises(JanusUrlRefusedError, match="public address"):
        check_janus_url(url, [])


@pytest.mark.parametrize(("url", "reason"), [
    ("http://user:pass@10.0.0.5/janus", "user name or password"),
    ("https://admin@meet.example.edu/janus", "user name or password"),
    ("ftp://meet.example.edu/janus", "http:// or https://"),
    ("http:///janus", "http:// or https://"),
    ("http://meet.example.edu:99999/janus", "invalid port"),
    ("http://no-such-host.invalid/janus", "cannot be resolved"),
])
def test_malformed_urls_are_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(JanusUrlRefusedError, match=reason):
        check_janus_url(url, [])


def test_a_public_address_is_pinned() -> None:
    checked = check_janus_url("https://93.184.216.34/janus/", [])
    assert checked.url == "https://93.184.216.34/janus" and checked.pinned_address == "93.184.216.34"


def test_an_allowlist_admits_its_urls_only_and_they_are_not_pinned() -> None:
    allowed = ["http://10.0.0.5:8088/janus", "https://Meet.Example.edu/janus/"]
    assert check_janus_url("http://10.0.0.5:8088/janus/", allowed).pinned_address is None
    assert check_janus_url("https://meet.example.edu/janus", allowed).url == "https://meet.example.edu/janus"
    for other in ("http://10.0.0.5:8089/janus", "https://93.184.216.34/janus", "http://127.0.0.1:6379/"):
        with pytest.raises(JanusUrlRefusedError, match="janus_allowed_urls"):
            check_janus_url(other, allowed)
