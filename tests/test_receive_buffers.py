"""The bot's media sockets get the kernel receive buffer it asks for (capped by net.core.rmem_max)."""

from __future__ import annotations

import socket
from pathlib import Path

from aiortc import RTCPeerConnection

from bot.janus import rtc_configuration
from bot.receive_buffers import enlarge_receive_buffers, media_sockets


def _kernel_limit() -> int:
    """What the kernel grants at most, as getsockopt reports it (double the usable size)."""
    return 2 * int(Path("/proc/sys/net/core/rmem_max").read_text())


async def test_media_sockets_get_a_larger_receive_buffer() -> None:
    peer = RTCPeerConnection(rtc_configuration())
    try:
        peer.addTransceiver("video", direction="recvonly")
        await peer.setLocalDescription(await peer.createOffer())  # gathers candidates: the sockets exist
        sockets = media_sockets(peer)
        assert sockets, "no ICE socket found on the peer connection"
        asked = 4 * 1024 * 1024
        granted = enlarge_receive_buffers(peer, asked)
        expected = min(2 * asked, _kernel_limit())
        assert granted == expected
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == expected for s in sockets)
        assert enlarge_receive_buffers(peer, 0) is None  # 0 leaves the OS default alone
    finally:
        await peer.close()
