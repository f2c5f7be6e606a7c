"""Benchmark helper: meeting participants that publish real WebRTC video into a Janus room.

Run by ``benchmarks/bot.py --webrtc`` as separate processes, so that the bot under test
shares no interpreter with its senders. Each participant is an aiortc peer connection
(its own Janus session, ICE, DTLS, SRTP, RTP) publishing a camera of real faces from
``../shared/media`` at 640×360 and 15 fps.

The clip is encoded to VP8 once per process, in memory, and every participant sends those
encoded frames on its own clock (aiortc packetises pre-encoded ``av.Packet`` objects as they
are). That keeps thirty or more senders affordable on the same two cores as the bot:
encoding thirty cameras live would cost more CPU than the bot being measured. The bot's
side is the real thing: every packet is received, decrypted, reassembled and decoded.

Usage (normally started by benchmarks/bot.py)::

    python benchmarks/webrtc_publishers.py JANUS_URL ROOM --first 1 --count 15 [--media-dir DIR]

It prints ``ready`` once every participant publishes, then runs until its standard input
closes, and prints one JSON line with its own CPU use before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import sys
import time
from pathlib import Path
from typing import Any

import av

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from bot.janus import JanusRoomClient, PublishedFeed, publish_tracks  # noqa: E402
from bot.live import decode_video_frames  # noqa: E402

#: Frame rate of every camera.
CAMERA_FPS = 15
#: The clips sent, alternating between participants (one face each, 640×360).
CLIPS = ("WolfgangLanger_Pexels.mp4", "single_face.mp4")
#: Seconds of each clip encoded and looped.
CLIP_SECONDS = 10
#: VP8 bitrate of a camera: what a browser sends for 360p at 15 fps on a good network.
BITRATE = 400_000
#: A keyframe every two seconds: a subscriber that joins (or loses packets) waits at most that long.
KEYFRAME_INTERVAL = 2 * CAMERA_FPS
#: The RTP clock of video.
VIDEO_CLOCK = fractions.Fraction(1, 90_000)


def encode_clip(path: Path) -> list[bytes]:
    """The first CLIP_SECONDS of a clip as VP8 frames (640×360, CAMERA_FPS), encoded in memory."""
    frames = decode_video_frames(path, limit=CAMERA_FPS * CLIP_SECONDS)
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = 640, 360, "yuv420p"
    codec.time_base = fractions.Fraction(1, CAMERA_FPS)
    codec.framerate = fractions.Fraction(CAMERA_FPS, 1)
    codec.bit_rate = BITRATE
    codec.gop_size = KEYFRAME_INTERVAL
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "error-resilient": "1"}
    encoded: list[bytes] = []
    for index, frame in enumerate(frames):
        scaled = frame.reformat(width=640, height=360, format="yuv420p")
        scaled.pts = index
        scaled.time_base = codec.time_base
        encoded.extend(bytes(packet) for packet in codec.encode(scaled))
    encoded.extend(bytes(packet) for packet in codec.encode(None))
    # The loop restarts on the first frame, which must be a keyframe (bit 0 of a VP8 frame tag is 0 for one).
    assert encoded and encoded[0][0] & 1 == 0, "the clip does not start with a keyframe"
    return encoded


def encoded_camera(frames: list[bytes], offset: float) -> Any:
    """A video track that sends ``frames`` in a loop at CAMERA_FPS, ``offset`` seconds into each frame interval.

    Its clock starts at the first frame aiortc asks for (once the connection is up), so a
    slow join never turns into a burst of late frames.
    """
    from aiortc import MediaStreamTrack

    class EncodedCamera(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self.sent = 0
            self.start = 0.0

        async def recv(self) -> av.Packet:  # type: ignore[override]  # aiortc packs pre-encoded packets
            if self.sent == 0:
                self.start = time.monotonic() + offset
            due = self.start + self.sent / CAMERA_FPS
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            packet = av.Packet(frames[self.sent % len(frames)])
            packet.pts = round(self.sent * 90_000 / CAMERA_FPS)
            packet.time_base = VIDEO_CLOCK
            self.sent += 1
            return packet

    return EncodedCamera()


async def publish_all(url: str, room: int, first: int, count: int,
                      media_dir: Path) -> list[tuple[JanusRoomClient, PublishedFeed]]:
    """Join ``count`` participants named "Student NN" from ``first`` on, each publishing one camera."""
    clips = [encode_clip(media_dir / name) for name in CLIPS]
    feeds: list[tuple[JanusRoomClient, PublishedFeed]] = []

    async def join(number: int) -> None:
        client = JanusRoomClient(url, request_timeout=20.0)
        await client.connect()
        # Spread the senders over a frame interval, as independent cameras are.
        camera = encoded_camera(clips[number % len(clips)], (number % CAMERA_FPS) / CAMERA_FPS ** 2)
        feeds.append((client, await publish_tracks(client, room, f"Student {number:02d}", [camera])))

    # A few at a time: a burst of DTLS handshakes on two cores would time some of them out.
    for batch in range(first, first + count, 5):
        await asyncio.gather(*(join(number) for number in range(batch, min(batch + 5, first + count))))
    return feeds


async def main_async(args: argparse.Namespace) -> None:
    """Publish, say ``ready``, wait for standard input to close, leave."""
    wall, cpu = time.monotonic(), time.process_time()
    feeds = await publish_all(args.url, args.room, args.first, args.count, args.media_dir)
    print("ready", flush=True)
    measured_wall, measured_cpu = time.monotonic(), time.process_time()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    measured = {"cores": (time.process_time() - measured_cpu) / max(time.monotonic() - measured_wall, 1e-6),
                "setup_seconds": measured_wall - wall, "setup_cpu_seconds": measured_cpu - cpu,
                "participants": len(feeds)}
    for client, feed in feeds:
        await feed.close()
        await client.aclose()
    print(json.dumps(measured), flush=True)


def main() -> None:
    """Parse arguments and publish until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="Janus HTTP API URL")
    parser.add_argument("room", type=int, help="VideoRoom room number")
    parser.add_argument("--first", type=int, default=1, help="number of the first participant")
    parser.add_argument("--count", type=int, default=10, help="participants this process publishes")
    parser.add_argument("--media-dir", type=Path, default=REPO_ROOT.parent / "shared" / "media")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
