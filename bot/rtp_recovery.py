"""Unsticking a video receiver whose jitter buffer waits for packets that will never come.

aiortc's video jitter buffer hands a frame to the decoder only when every packet from its
origin onwards is there. When the bot stalls for a few seconds (CPU starvation, a paused
process), the packets it missed are older than the SFU's retransmission window, so the
hole at the origin is never filled. aiortc only gives up on it once 512 newer packets
have arrived: at the 15–20 packets per second of a webcam capped at 128 kbit/s, that is
half a minute of a student's video lost after a 5-second hiccup.

:func:`restart_video_receiver` drops what the buffer holds and asks the sender for a new
keyframe (RTCP PLI), so that decoding resumes with the next keyframe, within about a
second. aiortc exposes neither operation, so this reaches into its receiver's private
state; when that state is not where this module expects it (another aiortc release), it
changes nothing and says so, and the caller falls back to subscribing again.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: The attribute names aiortc (1.14–1.16) gives the receiver's jitter buffer and remote streams.
_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
_REMOTE_STREAMS = "_RTCRtpReceiver__remote_streams"


async def restart_video_receiver(receiver: Any) -> bool:
    """Empty a video receiver's jitter buffer and request a keyframe from each remote source.

    Returns False (and changes nothing) when the receiver is not an aiortc video receiver
    this module knows how to reach into, or when nothing has been received yet.
    """
    from aiortc.jitterbuffer import JitterBuffer

    buffer = getattr(receiver, _JITTER_BUFFER, None)
    sources = getattr(receiver, _REMOTE_STREAMS, None)
    send_pli = getattr(receiver, "_send_rtcp_pli", None)
    if not isinstance(buffer, JitterBuffer) or not isinstance(sources, dict) or send_pli is None:
        logger.debug("cannot restart receiver %r: unknown aiortc internals", receiver)
        return False
    if not sources:
        return False
    # A fresh buffer takes the next packet as its origin; the partial frame it may start with
    # fails to decode, which makes aiortc ask for a keyframe too.
    try:
        fresh = JitterBuffer(capacity=buffer.capacity, is_video=True)
    except TypeError:  # a release whose buffer takes other arguments
        return False
    setattr(receiver, _JITTER_BUFFER, fresh)
    for ssrc in list(sources):
        await send_pli(ssrc)
    return True
