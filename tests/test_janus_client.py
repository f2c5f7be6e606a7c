"""JanusRoomClient against a real Janus: rooms, typed errors, publishing, multistream subscription, restarts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bot.janus import (
    ConnectionLost,
    JanusConnectionLostError,
    JanusRoomClient,
    JanusRoomNotFoundError,
    JanusUnauthorizedError,
    JanusUnreachableError,
    Jsep,
    PublisherGone,
    PublishersAnnounced,
    RoomEvent,
    publish_tracks,
    rtc_configuration,
)
from tests.janus_server import JanusServer, LoopingVideoTrack, free_tcp_port, janus_server  # noqa: F401

pytestmark = [pytest.mark.janus]

PIN = "1234-pin"


async def _event_of(client: JanusRoomClient, kind: type[Any], timeout: float = 20.0) -> Any:
    """The next event of ``kind`` (others are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        event: RoomEvent | None = await client.next_event(deadline - loop.time())
        if isinstance(event, kind):
            return event
    raise AssertionError(f"no {kind.__name__} within {timeout} s")


async def test_unreachable_server_is_a_typed_error(janus_server: JanusServer) -> None:  # noqa: F811
    url = f"http://{janus_server.host}:{free_tcp_port(janus_server.host)}/janus"
    client = JanusRoomClient(url, request_timeout=3)
    with pytest.raises(JanusUnreachableError, match="cannot reach Janus"):
        await client.connect()
    await client.aclose()


async def test_a_pinned_address_is_used_instead_of_resolving_the_host(janus_server: JanusServer) -> None:  # noqa: F811
    # The invite API checks the address a host name resolves to, then pins it: requests go to
    # that IP (the name here resolves nowhere), with the name in the Host header.
    port = janus_server.url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]
    async with JanusRoomClient(f"http://janus.classlens.invalid:{port}/janus",
                               pinned_address=janus_server.host) as client:
        assert client.session_id is not None
        assert (await client.attach()) is not None


async def test_missing_room_and_wrong_pin_are_typed_errors(janus_server: JanusServer) -> None:  # noqa: F811
    async with JanusRoomClient(janus_server.url) as client:
        admin = await client.attach()
        await admin.create_room(7001, pin=PIN)
        try:
            assert await admin.room_exists(7001) and not await admin.room_exists(7002)
            with pytest.raises(JanusRoomNotFoundError) as missing:
                await (await client.attach()).join_as_publisher(7002, "Ada")
            assert missing.value.code == 426
            with pytest.raises(JanusUnauthorizedError) as wrong:
                await (await client.attach()).join_as_publisher(7001, "Ada", pin="not-it")
            assert wrong.value.code == 433
        finally:
            await admin.destroy_room(7001)


@pytest.mark.media
async def test_multistream_subscription_follows_joins_and_leaves(janus_server: JanusServer) -> None:  # noqa: F811
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from tests.conftest import MEDIA_DIR

    room = 7003
    async with JanusRoomClient(janus_server.url) as ada_client, JanusRoomClient(janus_server.url) as bot, \
            JanusRoomClient(janus_server.url) as ben_client:
        admin = await bot.attach()
        await admin.create_room(room, pin=PIN)
        peer = RTCPeerConnection(rtc_configuration())
        ada = await publish_tracks(ada_client, room, "Ada", [LoopingVideoTrack(MEDIA_DIR / "single_face.mp4").track],
                                   pin=PIN)
        try:
            own = await (await bot.attach()).join_as_publisher(room, "observer", pin=PIN)
            announced = own.publishers or (await _event_of(bot, PublishersAnnounced)).publishers
            assert [p.display for p in announced] == ["Ada"]
            subscriber = await bot.attach()

            async def negotiate(offer: Jsep) -> None:
                await peer.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type=offer.type))
                await peer.setLocalDescription(await peer.createAnswer())
                await subscriber.start(Jsep(peer.localDescription.type, peer.localDescription.sdp))

            await negotiate(await subscriber.subscribe(room, [(announced[0].feed_id, announced[0].video_mids[0])],
                                                       private_id=own.private_id, pin=PIN))

            def track_of(name: str) -> Any:
                for transceiver in peer.getTransceivers():
                    stream = subscriber.feed_for_mid(str(transceiver.mid))
                    if stream is not None and stream.active and stream.feed_display == name:
                        return transceiver.receiver.track
                raise AssertionError(f"no subscribed stream of {name}")

            frame = await asyncio.wait_for(track_of("Ada").recv(), 20)
            assert (frame.width, frame.height) == (640, 360)

            # A later joiner is added to the same subscriber handle with "update".
            ben = await publish_tracks(ben_client, room, "Ben",
                                       [LoopingVideoTrack(MEDIA_DIR / "WolfgangLanger_Pexels.mp4").track], pin=PIN)
            late = (await _event_of(bot, PublishersAnnounced)).publishers
            assert [p.display for p in late] == ["Ben"]
            offer = await subscriber.update(subscribe=[(late[0].feed_id, late[0].video_mids[0])])
            assert offer is not None
            await negotiate(offer)
            assert {s.feed_display for s in subscriber.subscribed if s.active} == {"Ada", "Ben"}
            await asyncio.wait_for(track_of("Ben").recv(), 20)

            await ben.close()
            gone = await _event_of(bot, PublisherGone)
            assert gone.feed_id == late[0].feed_id
        finally:
            await ada.close()
            await peer.close()
            await admin.destroy_room(room)


async def test_a_janus_restart_is_reported_as_connection_lost(janus_server: JanusServer) -> None:  # noqa: F811
    client = JanusRoomClient(janus_server.url, request_timeout=3)
    await client.connect()
    try:
        handle = await client.attach()
        janus_server.restart()
        lost = await _event_of(client, ConnectionLost, timeout=60)
        assert lost.reason and client.lost is not None
        with pytest.raises(JanusConnectionLostError):
            await handle.room_exists(1)
    finally:
        await client.aclose()
