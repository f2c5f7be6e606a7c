"""Larger kernel receive buffers for the bot's media sockets.

All of a meeting's video reaches the bot on one bundled UDP socket, and asyncio reads one
datagram from it per turn of the event loop. While the loop is busy for a moment (many
frames handed over at once, a garbage collection), datagrams wait in the socket's kernel
buffer. Linux' default buffer (``net.core.rmem_default``, usually 208 KiB) holds about
150 ms of a 25-participant class at 400 kbit/s each; past that the kernel drops packets,
the frames they belonged to are lost, and a VP8 stream decodes nothing until its next
keyframe. ``benchmarks/bot.py --webrtc`` measured exactly that: 25 participants received
25 % of their frames with the default buffer and all of them with 4 MiB.

The kernel caps the size at ``net.core.rmem_max``; a bot host for large classes raises it
(docs/deploy.md). The sockets belong to aioice inside aiortc, which offers no option for
this, so they are reached through the peer connection's transports.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

logger = logging.getLogger(__name__)

_warned_capped = False


def media_sockets(peer: RTCPeerConnection) -> list[socket.socket]:
    """The UDP sockets of a peer connection's ICE transports (empty if aiortc's internals moved)."""
    sockets: dict[int, socket.socket] = {}
    for transceiver in peer.getTransceivers():
        try:
            connection: Any = transceiver.receiver.transport.transport._connection
            protocols = list(connection._protocols)
        except AttributeError:
            logger.debug("cannot reach the ICE sockets of aiortc %s; receive buffers stay as they are",
                         type(peer).__module__)
            continue
        for protocol in protocols:
            transport = getattr(protocol, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                sockets[sock.fileno()] = sock
    return list(sockets.values())


def enlarge_receive_buffers(peer: RTCPeerConnection, size_bytes: int) -> int | None:
    """Ask for ``size_bytes`` of kernel receive buffer on every media socket of ``peer``.

    Returns the smallest size the kernel granted (it reports double the usable size on
    Linux, which is what is returned), or None when there was nothing to change. Warns
    once per process when the kernel granted much less than asked for.
    """
    global _warned_capped
    if size_bytes <= 0:
        return None
    granted: list[int] = []
    for sock in media_sockets(peer):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size_bytes)
            granted.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        except OSError as exc:
            logger.debug("cannot set the receive buffer of a media socket: %s", exc)
    if not granted:
        return None
    smallest = min(granted)
    if smallest < size_bytes and not _warned_capped:
        _warned_capped = True
        logger.warning("the kernel capped the bot's media receive buffer at %d KiB (asked for %d KiB); for large "
                       "classes raise net.core.rmem_max (docs/deploy.md)", smallest // 1024, size_bytes // 1024)
    return smallest
