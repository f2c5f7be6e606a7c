"""WHIP ingest: aiortc clients push participants' video to the bot over real UDP; signalling goes through ASGI."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Header, HTTPException
from sqlmodel import select

from bot.whip import WHIP_PATH, WhipIngest
from kernel.settings import Settings
from kernel.store import (
    Analysis,
    AnalysisStatus,
    FaceObservation,
    StreamStats,
    Student,
    User,
    init_store,
    session_scope,
)
from pipeline.models import PipelineComponents
from tests import media_factory
from tests.conftest import MEDIA_DIR

TOKEN = "test-token-for-the-whip-endpoint"


def bearer_user(engine: Any, user_id: int) -> Callable[..., User]:
    """A small stand-in for the web app's auth dependency: one Bearer token, one user."""

    def current_user(authorization: Annotated[str | None, Header()] = None) -> User:
        if authorization != f"Bearer {TOKEN}":
            raise HTTPException(401, "missing or wrong API token")
        with session_scope(engine) as session:
            user = session.get(User, user_id)
            assert user is not None
            return user

    return current_user


@contextlib.asynccontextmanager
async def whip_app(data_dir: Path, components: PipelineComponents,
                   **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, WhipIngest]]:
    """The WHIP router in an app with these settings, an HTTP client for it, and the ingest state (closed after)."""
    from fastapi import FastAPI

    settings = Settings(data_dir=data_dir, sample_fps=2.0, min_student_seconds=1.0,
                        execution_provider="cpu", batch_size=8, **overrides)
    engine = init_store(settings.resolved_database_url)
    with session_scope(engine) as session:
        user = User(email="teacher@example.org", password_hash="not-used-here")
        session.add(user)
        session.flush()
        assert user.id is not None
        user_id = user.id
    ingest = WhipIngest(settings, components=components, engine=engine)
    app = FastAPI()
    app.include_router(ingest.router(bearer_user(engine, user_id)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bot.test",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        try:
            yield client, ingest
        finally:
            await ingest.aclose()


@pytest.fixture
async def whip(isolated_env: Path,
               components: PipelineComponents) -> AsyncIterator[tuple[httpx.AsyncClient, WhipIngest]]:
    """The WHIP router with the default caps and timeouts."""
    async with whip_app(isolated_env / "data", components) as pair:
        yield pair


async def sending_peer(*paths: Path) -> tuple[Any, list[Any]]:
    """An aiortc client sending each video file as one track (looping); returns the peer and the players."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.contrib.media import MediaPlayer

    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    players = [MediaPlayer(str(path), loop=True) for path in paths]
    for player in players:
        assert player.video is not None
        peer.addTransceiver(player.video, direction="sendonly")
    await peer.setLocalDescription(await peer.createOffer())
    return peer, players


async def close_peer(peer: Any, players: list[Any]) -> None:
    for player in players:
        if player.video is not None:
            player.video.stop()
    await peer.close()


async def _post_offer(client: httpx.AsyncClient, peer: Any, participant: str = "Ada") -> httpx.Response:
    """POST a client's offer to the WHIP endpoint for one named participant."""
    return await client.post(WHIP_PATH, content=peer.localDescription.sdp, params={"participant": participant},
                             headers={"Content-Type": "application/sdp"})


def _answer_directions(sdp: str) -> list[str]:
    return [line[2:] for line in sdp.splitlines() if line in ("a=sendrecv", "a=recvonly", "a=sendonly", "a=inactive")]


@pytest.mark.media
async def test_whip_clients_push_participants_and_hanging_up_finalises(
    whip: tuple[httpx.AsyncClient, WhipIngest],
) -> None:
    from aiortc import RTCSessionDescription

    client, ingest = whip
    first, first_players = await sending_peer(MEDIA_DIR / "single_face.mp4", MEDIA_DIR / "WolfgangLanger_Pexels.mp4")
    second, second_players = await sending_peer(MEDIA_DIR / "WolfgangLanger_Pexels.mp4")
    try:
        reply = await client.post(WHIP_PATH, content=first.localDescription.sdp,
                                  headers={"Content-Type": "application/sdp"},
                                  params=[("participant", "Ada"), ("participant", "Bob"), ("title", "Maths"),
                                          ("consent", "opt_out"), ("consent_name", "bob")])
        assert reply.status_code == 201, reply.text
        assert reply.headers["content-type"].startswith("application/sdp")
        location, analysis_id = reply.headers["location"], int(reply.headers["x-classlens-session"])
        assert location.startswith(f"{WHIP_PATH}/")
        # Bob opted out: his m-line is answered inactive, so his video is never even sent.
        assert _answer_directions(reply.text) == ["recvonly", "inactive"]
        await first.setRemoteDescription(RTCSessionDescription(sdp=reply.text, type="answer"))

        joined = await client.post(WHIP_PATH, content=second.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp"},
                                   params={"participant": "0=Cleo", "session": str(analysis_id)})
        assert joined.status_code == 201, joined.text
        assert int(joined.headers["x-classlens-session"]) == analysis_id
        await second.setRemoteDescription(RTCSessionDescription(sdp=joined.text, type="answer"))

        await asyncio.sleep(5.0)
        live = (await client.get(f"{WHIP_PATH}/sessions/{analysis_id}")).json()
        assert live["excluded"] == 1
        received = {p["display_name"]: p["frames_received"] for p in live["participants"].values()}
        assert set(received) == {"Ada", "Cleo"} and min(received.values()) > 0

        gone = await client.delete(location)
        assert gone.status_code == 200 and gone.json()["session_finished"] is False
        last = await client.delete(joined.headers["location"])
        assert last.json() == {"resource": joined.headers["location"].rsplit("/", 1)[1],
                               "session_finished": True, "status": "done"}
        assert (await client.delete(location)).status_code == 404
    finally:
        await close_peer(first, first_players)
        await close_peer(second, second_players)

    with session_scope(ingest.engine) as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None and analysis.status is AnalysisStatus.done
        assert analysis.kind == "meeting" and analysis.title == "Maths" and analysis.host_email == "teacher@example.org"
        assert analysis.report_path and (Path(analysis.report_path) / "index.html").is_file()
        students = list(session.exec(select(Student).where(Student.analysis_id == analysis_id)))
        assert sorted(s.label for s in students) == ["Ada", "Cleo"]
        streams = {s.stream: s for s in session.exec(select(StreamStats).where(StreamStats.analysis_id == analysis_id))}
        assert set(streams) == {"Ada", "Cleo"}
        assert all(s.frames_sampled >= 4 and s.left_reason == "the participant hung up" for s in streams.values())
        observations = list(session.exec(select(FaceObservation).where(FaceObservation.analysis_id == analysis_id)))
        assert {o.stream for o in observations} == {"Ada", "Cleo"}


@pytest.mark.media
async def test_bad_offers_get_a_clear_error_and_leave_nothing_behind(
    whip: tuple[httpx.AsyncClient, WhipIngest],
) -> None:
    client, ingest = whip
    sdp = {"Content-Type": "application/sdp"}
    peer, players = await sending_peer(MEDIA_DIR / "single_face.mp4")
    try:
        offer = peer.localDescription.sdp
        wrong_type = await client.post(WHIP_PATH, content=offer, params={"participant": "Ada"},
                                       headers={"Content-Type": "application/json"})
        assert wrong_type.status_code == 415 and "application/sdp" in wrong_type.json()["detail"]

        garbage = await client.post(WHIP_PATH, content="hello, bot", params={"participant": "Ada"}, headers=sdp)
        assert garbage.status_code == 400
        assert garbage.json()["detail"] == "malformed SDP offer: it must start with 'v=0'"

        unnamed = await client.post(WHIP_PATH, content=offer, headers=sdp)
        assert unnamed.status_code == 400 and "participant display name" in unnamed.json()["detail"]

        # Only codecs the bot cannot decode.
        vp9_only = offer.replace("VP8/90000", "VP9/90000").replace("H264/90000", "AV1/90000")
        unsupported = await client.post(WHIP_PATH, content=vp9_only, params={"participant": "Ada"}, headers=sdp)
        assert unsupported.status_code == 422
        assert unsupported.json()["detail"].startswith("the SDP offer has no video in a supported codec (VP8, H264)")

        broken_ice = "\r\n".join(line for line in offer.splitlines() if not line.startswith("a=ice-ufrag"))
        negotiation = await client.post(WHIP_PATH, content=broken_ice, params={"participant": "Ada"}, headers=sdp)
        assert negotiation.status_code == 400 and negotiation.json()["detail"].startswith("malformed SDP offer")

        # Offers too large, or with thousands of m-lines, are refused before anything is parsed or created.
        with session_scope(ingest.engine) as session:
            sessions_before = len(list(session.exec(select(Analysis))))
        crowded = offer.rstrip("\r\n") + "".join(f"\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:x{index}"
                                                  for index in range(40)) + "\r\n"
        too_many = await client.post(WHIP_PATH, content=crowded, params={"participant": "Ada"}, headers=sdp)
        assert too_many.status_code == 422 and "at most 32" in too_many.json()["detail"]
        huge = await client.post(WHIP_PATH, content=offer + "a=x-padding:" + "x" * 70_000 + "\r\n",
                                 params={"participant": "Ada"}, headers=sdp)
        assert huge.status_code == 413
        with session_scope(ingest.engine) as session:
            assert len(list(session.exec(select(Analysis)))) == sessions_before

        anonymous = await client.post(WHIP_PATH, content=offer, params={"participant": "Ada"},
                                      headers={**sdp, "Authorization": "Bearer wrong"})
        assert anonymous.status_code == 401
        assert (await client.post(WHIP_PATH, content=offer, headers=sdp,
                                  params={"participant": "Ada", "session": "999"})).status_code == 404
        assert (await client.delete(f"{WHIP_PATH}/no-such-resource")).status_code == 404
    finally:
        await close_peer(peer, players)

    with session_scope(ingest.engine) as session:
        # No offer brought media: none of them left a session in the archive, failed or running.
        assert list(session.exec(select(Analysis))) == []


@pytest.mark.media
async def test_a_client_that_goes_away_without_delete_still_ends_the_session(
    whip: tuple[httpx.AsyncClient, WhipIngest],
) -> None:
    from aiortc import RTCSessionDescription

    client, ingest = whip
    peer, players = await sending_peer(MEDIA_DIR / "single_face.mp4")
    try:
        reply = await _post_offer(client, peer)
        assert reply.status_code == 201, reply.text
        analysis_id = int(reply.headers["x-classlens-session"])
        await peer.setRemoteDescription(RTCSessionDescription(sdp=reply.text, type="answer"))
        await asyncio.sleep(3.0)
    finally:
        await close_peer(peer, players)  # no DELETE: the browser tab was closed
    status = None
    for _ in range(100):
        with session_scope(ingest.engine) as session:
            analysis = session.get(Analysis, analysis_id)
            assert analysis is not None
            status = analysis.status
        if status is not AnalysisStatus.running:
            break
        await asyncio.sleep(0.2)
    assert status is AnalysisStatus.done
    with session_scope(ingest.engine) as session:
        stats = session.exec(select(StreamStats).where(StreamStats.analysis_id == analysis_id)).one()
    assert stats.display_name == "Ada" and stats.frames_sampled >= 4
    assert stats.left_reason in ("the connection closed", "the connection failed", "the track ended")


@pytest.mark.media
async def test_whip_connections_are_capped_per_user_counting_offers_in_flight(
    isolated_env: Path, components: PipelineComponents,
) -> None:
    async with whip_app(isolated_env / "data", components, whip_max_connections_per_user=2,
                        whip_max_connections=10) as (client, ingest):
        peers = [await sending_peer(MEDIA_DIR / "single_face.mp4") for _ in range(5)]
        try:
            replies = await asyncio.gather(*(_post_offer(client, peer) for peer, _players in peers))
            statuses = sorted(reply.status_code for reply in replies)
            assert statuses == [201, 201, 429, 429, 429]
            refused = next(reply for reply in replies if reply.status_code == 429)
            assert "hang one up first" in refused.json()["detail"] and refused.headers["retry-after"]
            for reply in replies:
                if reply.status_code == 201:
                    assert (await client.delete(reply.headers["location"])).status_code == 200
            # Hung up: the slots are free again.
            again = await _post_offer(client, peers[0][0])
            assert again.status_code == 201, again.text
            # The server-wide cap counts every user's connections.
            ingest.settings = ingest.settings.model_copy(update={"whip_max_connections": 1})
            full = await _post_offer(client, peers[1][0])
            assert full.status_code == 429 and "this server already takes 1" in full.json()["detail"]
            # A session takes a bounded number of participants over all its connections.
            ingest.settings = ingest.settings.model_copy(update={"whip_max_connections": 10,
                                                                 "whip_max_participants_per_session": 1})
            crowded = await client.post(WHIP_PATH, content=peers[1][0].localDescription.sdp,
                                        params={"participant": "Bea", "session": again.headers["x-classlens-session"]},
                                        headers={"Content-Type": "application/sdp"})
            assert crowded.status_code == 422 and "at most 1 participants" in crowded.json()["detail"]
        finally:
            for peer, players in peers:
                await close_peer(peer, players)


@pytest.mark.media
async def test_a_peer_that_never_connects_is_hung_up_and_leaves_no_session(
    isolated_env: Path, components: PipelineComponents,
) -> None:
    async with whip_app(isolated_env / "data", components, whip_connect_timeout_seconds=1.0) as (client, ingest):
        peer, players = await sending_peer(MEDIA_DIR / "single_face.mp4")
        try:
            # The answer is never applied: the peer never starts ICE, as a client that vanished after its POST.
            reply = await _post_offer(client, peer)
            assert reply.status_code == 201, reply.text
            analysis_id = int(reply.headers["x-classlens-session"])
            for _ in range(50):
                if (await client.get(f"{WHIP_PATH}/sessions/{analysis_id}")).status_code == 404:
                    break
                await asyncio.sleep(0.1)
            assert (await client.delete(reply.headers["location"])).status_code == 404  # already hung up
        finally:
            await close_peer(peer, players)
        with session_scope(ingest.engine) as session:
            assert session.get(Analysis, analysis_id) is None


@pytest.mark.media
@pytest.mark.ocr
async def test_a_shared_gallery_window_gives_one_named_student_per_tile(
    whip: tuple[httpx.AsyncClient, WhipIngest], tmp_path: Path,
) -> None:
    """OBS's WHIP output of a meeting window: one video track showing a 2×2 gallery with name plates."""
    from aiortc import RTCSessionDescription

    from tests.test_gallery import PEOPLE, _photo

    client, ingest = whip
    names = ["Zoë Martín", "Seán O'Neill", "Ana Lee", "Jean-Luc Dubois"]
    window = tmp_path / "meeting-window.mp4"  # a screen capture the test makes; the bot writes nothing
    window.write_bytes(media_factory.gallery_recording(
        [(8, [(_photo(person), name) for person, name in zip(PEOPLE, names, strict=False)], 2)], fps=10).getvalue())
    peer, players = await sending_peer(window)
    try:
        reply = await client.post(WHIP_PATH, content=peer.localDescription.sdp,
                                  headers={"Content-Type": "application/sdp"},
                                  params={"participant": "Teacher's window", "layout": "gallery", "title": "Gallery"})
        assert reply.status_code == 201, reply.text
        analysis_id = int(reply.headers["x-classlens-session"])
        await peer.setRemoteDescription(RTCSessionDescription(sdp=reply.text, type="answer"))
        await asyncio.sleep(8.0)
        ended = await client.post(f"{WHIP_PATH}/sessions/{analysis_id}/end")
        assert ended.status_code == 200, ended.text
    finally:
        await close_peer(peer, players)

    with session_scope(ingest.engine) as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None and analysis.status is AnalysisStatus.done and analysis.layout == "gallery"
        students = list(session.exec(select(Student).where(Student.analysis_id == analysis_id)))
    assert sorted(s.label for s in students) == sorted(names)
    assert {s.name_source for s in students} == {"label"}
