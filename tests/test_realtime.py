"""GET /v1/realtime: OpenAI's Realtime API (transcription sessions) over a real server, with the
official openai SDK's realtime client as the client. Every server event received is validated
strictly against the SDK's own pydantic types (the union of server events), not just parsed.

Audio goes out as 24 kHz (or 16 kHz) 16-bit PCM in 50-ms chunks, paced at twice real time where
the VAD's and the interim decodes' timing matters (the VAD sees the same audio whatever the pace;
interim decodes are scheduled by audio time, one at a time per turn)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.realtime import decode_pcm
import httpx
import numpy as np
import pytest
from pydantic import TypeAdapter

from tests.conftest import CLIPS, Server, english_wer

CHUNK_MS = 50
SPEED = 2.0  # times real time
RATE = 24000


def _server_event_types() -> dict[str, type]:
    """The SDK's server event types by their `type`: the members of its RealtimeServerEvent union
    (and the beta transcription_session.updated)."""
    from typing import get_args

    from openai.types.beta.realtime.transcription_session_updated_event import TranscriptionSessionUpdatedEvent
    from openai.types.realtime import RealtimeServerEvent

    union = get_args(RealtimeServerEvent)[0]
    types = {}
    for member in [*get_args(union), TranscriptionSessionUpdatedEvent]:
        types[get_args(member.model_fields["type"].annotation)[0]] = member
    return types


SERVER_EVENTS = _server_event_types()


def pcm(path: Path, rate: int = RATE) -> bytes:
    """A clip as 16-bit little-endian mono PCM at `rate` (FFmpeg's resampler: independent of ours)."""
    return decode_pcm(path, rate)


def silence(seconds: float, rate: int = RATE) -> bytes:
    return bytes(2 * int(seconds * rate))


def noise(seconds: float, amplitude: float, rate: int = RATE, seed: int = 0) -> bytes:
    samples = np.random.default_rng(seed).standard_normal(int(seconds * rate)) * amplitude
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def client(url: str, api_key: str = "not-needed"):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


def validated(raw: bytes | str) -> dict:
    """A server event, checked against the SDK's types: every required field there, rightly typed."""
    data = json.loads(raw)
    assert data["type"] in SERVER_EVENTS, f"not a server event type of the SDK: {data['type']}"
    checked = data
    audio_format = (data.get("session") or {}).get("audio", {}).get("input", {}).get("format") or {}
    if audio_format.get("rate") == 16000:  # our one extension: the SDK's type allows 24000 only (it parses it, leniently)
        checked = json.loads(raw)
        checked["session"]["audio"]["input"]["format"]["rate"] = 24000
    TypeAdapter(SERVER_EVENTS[data["type"]]).validate_python(checked)
    return data


async def receive(conn, timeout: float = 120) -> dict:
    raw = await asyncio.wait_for(conn.recv_bytes(), timeout)
    data = validated(raw)
    parsed = conn.parse_event(raw)  # what an SDK user gets
    assert parsed.type == data["type"]
    return data


async def send_audio(conn, data: bytes, rate: int = RATE, speed: float | None = SPEED, chunk_ms: int = CHUNK_MS) -> list[float]:
    """Append `data` in chunks, paced at `speed` × real time (None: as fast as possible); the send
    time of each chunk."""
    step = rate * 2 * chunk_ms // 1000
    start = time.perf_counter()
    sent = []
    for n, i in enumerate(range(0, len(data), step)):
        await conn.send({"type": "input_audio_buffer.append", "audio": b64(data[i : i + step])})
        sent.append(time.perf_counter())
        if speed:
            await asyncio.sleep(max(0.0, start + (n + 1) * chunk_ms / 1000 / speed - time.perf_counter()))
    return sent


async def configure(conn, **audio_input) -> dict:
    await conn.send({"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio_input}}})
    while True:
        event = await receive(conn)
        if event["type"] in ("session.updated", "error"):
            return event


def words(text: str) -> list[str]:
    return [w for w in (re.sub(r"[^\w']+", "", w.lower()) for w in text.split()) if w]


@dataclass
class Run:
    events: list[tuple[float, dict]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [e for _, e in self.events if e["type"] == kind]

    def at(self, kind: str, item_id: str) -> list[float]:
        return [t for t, e in self.events if e["type"] == kind and e.get("item_id") == item_id]


async def collect_until(conn, run: Run, done, timeout: float = 120) -> None:
    deadline = time.perf_counter() + timeout
    while not done(run):
        try:
            event = await receive(conn, deadline - time.perf_counter())
        except Exception as e:
            seen = [(e["type"], e.get("item_id"), e.get("delta") or e.get("transcript") or e.get("error")) for _, e in run.events]
            raise AssertionError(f"{e!r} after {seen}") from e
        run.events.append((time.perf_counter(), event))


# ---------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def realtime_server(tmp_path_factory):
    with Server(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", MODELS_DIR=str(tmp_path_factory.mktemp("models"))) as server:
        yield server


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory):
    """One realtime session at most, API keys, a 2-s idle timeout."""
    with Server(
        MODELS="tiny.en", DEFAULT_MODEL="tiny.en", MODELS_DIR=str(tmp_path_factory.mktemp("models")),
        MAX_REALTIME_SESSIONS="1", API_KEYS="right-key", REALTIME_IDLE_TIMEOUT_S="2",
    ) as server:
        yield server


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ---------------------------------------------------------------- server_vad: two utterances

FIRST, SECOND = CLIPS["lj-LJ001-0002"], CLIPS["lj-LJ001-0001"]  # 1.9 s, 9.7 s
LEAD_S = 0.5


@pytest.fixture(scope="module")
def vad_run(realtime_server) -> Run:
    """Speech, 1 s of silence, speech (two LJ Speech clips), then silence, streamed at twice real
    time with server_vad; until both turns are completed."""
    stream = silence(LEAD_S) + pcm(FIRST.path) + silence(1.0) + pcm(SECOND.path) + silence(1.5)

    async def go() -> Run:
        run = Run()
        async with client(realtime_server.url).realtime.connect(model="tiny.en", extra_query={"intent": "transcription"}) as conn:
            created = await receive(conn)
            run.events.append((time.perf_counter(), created))
            updated = await configure(
                conn,
                format={"type": "audio/pcm", "rate": RATE},
                transcription={"model": "tiny.en", "language": "en"},
                turn_detection={"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500},
            )
            run.events.append((time.perf_counter(), updated))
            sender = asyncio.create_task(send_audio(conn, stream))
            await collect_until(conn, run, lambda r: len(r.of("conversation.item.input_audio_transcription.completed")) >= 2)
            await sender
        return run

    return asyncio.run(go())


def test_session_created_and_updated_describe_the_session(vad_run):
    created, updated = vad_run.events[0][1], vad_run.events[1][1]
    assert created["type"] == "session.created" and updated["type"] == "session.updated"
    session = updated["session"]
    assert session["type"] == "transcription" and session["id"] == created["session"]["id"]
    audio = session["audio"]["input"]
    assert audio["format"] == {"type": "audio/pcm", "rate": 24000}
    assert audio["transcription"]["model"] == "tiny.en:int8+flash" and audio["transcription"]["language"] == "en"
    assert audio["turn_detection"] == {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
    # the defaults: server_vad, 24 kHz, DEFAULT_MODEL (named by ?model=)
    assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"


def test_two_utterances_give_two_committed_items_with_the_right_words(vad_run):
    committed = vad_run.of("input_audio_buffer.committed")
    assert len(committed) == 2, [e["type"] for _, e in vad_run.events]
    first, second = (e["item_id"] for e in committed)
    assert committed[0]["previous_item_id"] is None and committed[1]["previous_item_id"] == first
    started = vad_run.of("input_audio_buffer.speech_started")
    stopped = vad_run.of("input_audio_buffer.speech_stopped")
    assert [e["item_id"] for e in started] == [first, second] == [e["item_id"] for e in stopped]
    # Where the VAD heard each turn, in the stream's time: speech starts minus the 300-ms padding,
    # ends after the 500-ms silence.
    second_start = LEAD_S + FIRST.duration + 1.0
    assert abs(started[0]["audio_start_ms"] / 1000 - (LEAD_S - 0.3)) < 0.25
    assert abs(started[1]["audio_start_ms"] / 1000 - (second_start - 0.3)) < 0.25
    assert LEAD_S + FIRST.duration + 0.3 < stopped[0]["audio_end_ms"] / 1000 < second_start - 0.2
    assert second_start + SECOND.duration < stopped[1]["audio_end_ms"] / 1000 < second_start + SECOND.duration + 1.5

    completed = {e["item_id"]: e for e in vad_run.of("conversation.item.input_audio_transcription.completed")}
    assert set(completed) == {first, second}
    assert english_wer([FIRST.text, SECOND.text], [completed[first]["transcript"], completed[second]["transcript"]]) < 0.15
    for item, clip in ((first, FIRST), (second, SECOND)):
        assert completed[item]["content_index"] == 0
        assert completed[item]["usage"]["type"] == "duration" and completed[item]["usage"]["seconds"] > clip.duration
        # committed before completed
        assert vad_run.at("input_audio_buffer.committed", item)[0] <= vad_run.at(
            "conversation.item.input_audio_transcription.completed", item
        )[0]


def test_interim_deltas_come_before_completed_and_only_extend(vad_run):
    """The 9.7-s turn is re-decoded every second while spoken: words two decodes agree on go out
    as deltas before the turn ends, each delta extending the text; then the final decode's rest.
    The deltas add up to the completed transcript's words (punctuation and case aside) whenever
    the final decode kept the words sent, as here."""
    second = vad_run.of("input_audio_buffer.committed")[1]["item_id"]
    deltas = [(t, e) for t, e in vad_run.events if e["type"].endswith(".delta") and e["item_id"] == second]
    stopped_at = vad_run.at("input_audio_buffer.speech_stopped", second)[0]
    completed_at = vad_run.at("conversation.item.input_audio_transcription.completed", second)[0]
    assert any(t < stopped_at for t, _ in deltas), "no interim delta while the turn was spoken"
    assert all(t <= completed_at for t, _ in deltas)
    assert all(e["content_index"] == 0 and e["delta"] for _, e in deltas)
    text = ""
    for _, e in deltas:  # append-only: each delta keeps every word before it
        before = words(text)
        text += e["delta"]
        assert words(text)[: len(before)] == before
    completed = vad_run.of("conversation.item.input_audio_transcription.completed")[1]["transcript"]
    assert words(text) == words(completed)
    # the first item, too short for an interim decode, gets its transcript as one delta
    first = vad_run.of("input_audio_buffer.committed")[0]["item_id"]
    first_deltas = [e["delta"] for _, e in vad_run.events if e["type"].endswith(".delta") and e["item_id"] == first]
    assert words("".join(first_deltas)) == words(vad_run.of("conversation.item.input_audio_transcription.completed")[0]["transcript"])


# ---------------------------------------------------------------- manual commits


def test_manual_commit_mode_transcribes_a_committed_buffer(realtime_server, clips):
    jfk = clips["jfk"]

    async def go() -> tuple[dict, Run]:
        async with client(realtime_server.url).realtime.connect(model="tiny.en") as conn:
            await receive(conn)
            updated = await configure(conn, format={"type": "audio/pcm", "rate": 16000}, turn_detection=None)
            await send_audio(conn, pcm(jfk.path, 16000), rate=16000, speed=None)
            await conn.send({"type": "input_audio_buffer.commit", "event_id": "commit-1"})
            run = Run()
            await collect_until(conn, run, lambda r: bool(r.of("conversation.item.input_audio_transcription.completed")))
            # An empty buffer cannot be committed; clearing answers cleared.
            await conn.send({"type": "input_audio_buffer.commit", "event_id": "commit-2"})
            await collect_until(conn, run, lambda r: bool(r.of("error")))
            await conn.send({"type": "input_audio_buffer.append", "audio": b64(silence(0.5, 16000))})
            await conn.send({"type": "input_audio_buffer.clear"})
            await collect_until(conn, run, lambda r: bool(r.of("input_audio_buffer.cleared")))
            return updated, run

    updated, run = asyncio.run(go())
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    assert updated["session"]["audio"]["input"]["format"]["rate"] == 16000
    assert not run.of("input_audio_buffer.speech_started")  # no VAD in manual mode
    (committed,) = run.of("input_audio_buffer.committed")
    (completed,) = run.of("conversation.item.input_audio_transcription.completed")
    assert completed["item_id"] == committed["item_id"]
    assert english_wer([jfk.text], [completed["transcript"]]) < 0.15
    assert completed["usage"]["seconds"] == pytest.approx(jfk.duration, abs=0.1)
    (error,) = run.of("error")
    assert error["error"]["code"] == "input_audio_buffer_commit_empty" and error["error"]["event_id"] == "commit-2"


def test_beta_transcription_session_update_is_accepted(realtime_server):
    async def go() -> dict:
        async with client(realtime_server.url).realtime.connect() as conn:
            await receive(conn)
            await conn.send({
                "type": "transcription_session.update",
                "session": {"input_audio_format": "pcm16", "input_audio_transcription": {"model": "whisper-1"}, "turn_detection": None},
            })
            return await receive(conn)

    event = asyncio.run(go())
    assert event["type"] == "transcription_session.updated"
    assert event["session"]["turn_detection"] is None and event["session"]["input_audio_format"] == "pcm16"
    assert event["session"]["input_audio_transcription"]["model"] == "whisper-1"  # DEFAULT_MODEL (tiny.en here)


# ---------------------------------------------------------------- bad events


def test_bad_events_get_error_events_and_the_session_goes_on(realtime_server, clips):
    bad = [
        ("raw", "{not json", None, "invalid_event"),
        ("raw", "[1, 2]", None, "invalid_event"),
        ("event", {"type": "response.create", "event_id": "e1"}, "e1", "invalid_value"),
        ("event", {"type": "no.such.event", "event_id": "e2"}, "e2", "invalid_value"),
        ("event", {"type": "input_audio_buffer.append", "audio": "@@not base64@@", "event_id": "e3"}, "e3", "invalid_value"),
        ("event", {"type": "input_audio_buffer.append", "audio": b64(b"\x00\x01\x02"), "event_id": "e4"}, "e4", "invalid_value"),
        ("event", {"type": "input_audio_buffer.append", "event_id": "e5"}, "e5", "invalid_value"),
        ("session", {"format": {"type": "audio/pcm", "rate": 44100}}, "e6", "invalid_value"),
        ("session", {"format": {"type": "audio/pcmu"}}, "e7", "unsupported_option"),
        ("session", {"turn_detection": {"type": "semantic_vad"}}, "e8", "unsupported_option"),
        ("session", {"turn_detection": {"type": "server_vad", "threshold": 3}}, "e9", "invalid_value"),
        ("session", {"transcription": {"model": "no-such-model"}}, "e10", "model_not_found"),
        ("session", {"transcription": {"model": "tiny.en", "language": "de"}}, "e11", "unsupported_option"),
        ("event", {"type": "session.update", "session": {"type": "realtime"}, "event_id": "e12"}, "e12", "unsupported_option"),
    ]
    jfk = clips["jfk"]

    async def go() -> tuple[list[dict], Run]:
        errors = []
        async with client(realtime_server.url).realtime.connect(model="tiny.en") as conn:
            await receive(conn)
            for kind, payload, event_id, _ in bad:
                if kind == "raw":
                    await conn.send_raw(payload)
                elif kind == "session":
                    await conn.send({"type": "session.update", "event_id": event_id, "session": {"type": "transcription", "audio": {"input": payload}}})
                else:
                    await conn.send(payload)
                errors.append(await receive(conn))
            # Still the same session, and it still transcribes (the failed updates changed nothing).
            await configure(conn, turn_detection=None)
            await send_audio(conn, pcm(jfk.path), speed=None)
            await conn.send({"type": "input_audio_buffer.commit"})
            run = Run()
            await collect_until(conn, run, lambda r: bool(r.of("conversation.item.input_audio_transcription.completed")))
            return errors, run

    errors, run = asyncio.run(go())
    for error, (_, payload, event_id, code) in zip(errors, bad):
        assert error["type"] == "error", (payload, error)
        assert error["error"]["code"] == code and error["error"]["event_id"] == event_id, (payload, error)
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    assert errors[7]["error"]["param"] == "session.audio.input.format.rate"
    assert errors[11]["error"]["param"] == "session.audio.input.transcription.model"
    (completed,) = run.of("conversation.item.input_audio_transcription.completed")
    assert english_wer([jfk.text], [completed["transcript"]]) < 0.15


def test_an_unknown_model_in_the_url_is_an_error_event_and_the_default_serves(realtime_server):
    async def go() -> tuple[dict, dict]:
        async with client(realtime_server.url).realtime.connect(model="gpt-4o-transcribe") as conn:
            return await receive(conn), await receive(conn)

    created, error = asyncio.run(go())
    assert created["type"] == "session.created"
    assert created["session"]["audio"]["input"]["transcription"]["model"] == "tiny.en:int8+flash"
    assert error["type"] == "error" and error["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- VAD on silence and noise


def test_vad_hears_no_turn_in_silence_or_low_noise(realtime_server):
    """Digital silence, then 4 s of white noise at -50 dBFS and 2 s at -40 dBFS: no speech_started,
    no item, no text; a commit then finds nothing to commit."""
    stream = silence(2.0) + noise(4.0, 0.003) + noise(2.0, 0.01, seed=1)

    async def go() -> Run:
        run = Run()
        async with client(realtime_server.url).realtime.connect(model="tiny.en") as conn:
            await receive(conn)
            await send_audio(conn, stream, speed=None)
            await conn.send({"type": "input_audio_buffer.commit", "event_id": "c"})  # answered after every append
            await collect_until(conn, run, lambda r: bool(r.of("error")))
        return run

    run = asyncio.run(go())
    assert [e["type"] for _, e in run.events] == ["error"]
    assert run.of("error")[0]["error"]["code"] == "input_audio_buffer_commit_empty"


# ---------------------------------------------------------------- disconnects


def test_a_disconnect_mid_turn_frees_its_work(realtime_server, clips):
    """A 29-s manual buffer committed, and the client gone at once: the session's final decode is
    cancelled (no completed is ever produced for it), the scheduler's queue and the live-session
    gauge go back to 0, and the server serves the next session."""
    long_clip = clips["mfa-michaelandsickmichael"]
    audio = pcm(long_clip.path)[: 2 * RATE * 29]
    before = scrape(realtime_server.url)

    async def go() -> None:
        async with client(realtime_server.url).realtime.connect(model="tiny.en") as conn:
            await receive(conn)
            await configure(conn, turn_detection=None)
            await send_audio(conn, audio, speed=None, chunk_ms=100)
            await conn.send({"type": "input_audio_buffer.commit"})
            while (await receive(conn))["type"] != "input_audio_buffer.committed":
                pass
            assert scrape(realtime_server.url)["whisper_realtime_sessions"] == 1

    asyncio.run(go())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = scrape(realtime_server.url)
        if after["whisper_realtime_sessions"] == 0 and after["whisper_queue_requests"] == 0:
            break
        time.sleep(0.1)
    assert after["whisper_realtime_sessions"] == 0 and after["whisper_queue_requests"] == 0
    assert after["whisper_queue_windows,model=tiny.en"] == 0
    # The final decode was dropped, not finished: no end-of-turn latency was observed for it.
    assert after["whisper_realtime_turn_latency_seconds_count"] == before["whisper_realtime_turn_latency_seconds_count"]
    assert after["whisper_realtime_audio_seconds_total"] - before["whisper_realtime_audio_seconds_total"] == pytest.approx(29, abs=0.01)

    async def next_session() -> dict:
        async with client(realtime_server.url).realtime.connect(model="tiny.en") as conn:
            return await receive(conn)

    assert asyncio.run(next_session())["type"] == "session.created"


# ---------------------------------------------------------------- limits and keys


def test_session_limit_refuses_with_a_clear_reason(limits_server):
    from websockets.exceptions import ConnectionClosedError

    async def go() -> tuple[dict, ConnectionClosedError]:
        async with client(limits_server.url, "right-key").realtime.connect(model="tiny.en") as first:
            assert (await receive(first))["type"] == "session.created"
            async with client(limits_server.url, "right-key").realtime.connect(model="tiny.en") as second:
                error = await receive(second)  # what the SDK user reads first
                with pytest.raises(ConnectionClosedError) as closed:
                    await second.recv()
            assert (await configure(first, turn_detection=None))["type"] == "session.updated"  # the first goes on
        return error, closed.value

    error, closed = asyncio.run(go())
    assert error["type"] == "error" and error["error"]["code"] == "session_limit_reached"
    assert error["error"]["type"] == "server_error" and "MAX_REALTIME_SESSIONS" in error["error"]["message"]
    assert closed.rcvd.code == 1013 and "MAX_REALTIME_SESSIONS" in closed.rcvd.reason  # try again later

    # Once the first has closed, a new session is served.
    async def again() -> dict:
        async with client(limits_server.url, "right-key").realtime.connect(model="tiny.en") as conn:
            return await receive(conn)

    assert asyncio.run(again())["type"] == "session.created"


def test_websocket_needs_the_api_key(limits_server):
    from websockets.exceptions import InvalidStatus

    async def connect(key: str):
        async with client(limits_server.url, key).realtime.connect(model="tiny.en") as conn:
            return await receive(conn)

    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(connect("wrong-key"))
    response = refused.value.response
    assert response.status_code == 401
    assert json.loads(response.body)["error"]["code"] == "invalid_api_key"
    assert asyncio.run(connect("right-key"))["type"] == "session.created"


def test_an_idle_session_is_closed_with_a_reason(limits_server):
    from websockets.exceptions import ConnectionClosedOK

    async def go() -> tuple[dict, ConnectionClosedOK, float]:
        async with client(limits_server.url, "right-key").realtime.connect(model="tiny.en") as conn:
            await receive(conn)
            start = time.monotonic()
            error = await receive(conn, timeout=10)
            with pytest.raises(ConnectionClosedOK) as closed:
                await conn.recv()
            return error, closed.value, time.monotonic() - start

    error, closed, waited = asyncio.run(go())
    assert error["error"]["code"] == "idle_timeout" and 1.5 < waited < 6
    assert closed.rcvd.code == 1000 and "idle" in closed.rcvd.reason


# ---------------------------------------------------------------- the replay command's arithmetic


def test_realtime_replay_measures_turns_from_the_chunks_that_ended_them():
    """loadtest.realtime on hand-made events: a turn's end of turn is timed from the chunk holding
    its audio_end_ms, its first delta from the chunk where its speech began."""
    from loadtest.realtime import SessionResult, Stream, held, turns

    result = SessionResult(Stream("s", b"", ["a"], ["x"]))
    result.sent = [10.0 + 0.04 * k for k in range(200)]  # 40-ms chunks from t = 10 s
    result.events = [
        (10.5, {"type": "input_audio_buffer.speech_started", "audio_start_ms": 200, "item_id": "i1"}),
        (11.9, {"type": "conversation.item.input_audio_transcription.delta", "item_id": "i1", "delta": "hi"}),
        (13.05, {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 3000, "item_id": "i1"}),
        (13.05, {"type": "input_audio_buffer.committed", "item_id": "i1", "previous_item_id": None}),
        (13.6, {"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1", "transcript": "hi there"}),
    ]
    (turn,) = turns(result, chunk_ms=40)
    assert turn.end_of_turn_s == pytest.approx(13.6 - (10.0 + 0.04 * 75))  # the chunk holding 3000 ms (+5 ms resampler)
    assert turn.first_delta_s == pytest.approx(11.9 - (10.0 + 0.04 * 12))  # speech began at 200 + 300 ms padding
    assert turn.interim and turn.transcript == "hi there" and turn.vad_lag_s == pytest.approx(0.05)
    levels = [
        {"sessions": 1, "refused_or_broken": 0, "end_of_turn_s": {"p95": 0.6}},
        {"sessions": 4, "refused_or_broken": 0, "end_of_turn_s": {"p95": 1.4}},
        {"sessions": 8, "refused_or_broken": 0, "end_of_turn_s": {"p95": 2.5}},
        {"sessions": 16, "refused_or_broken": 3, "end_of_turn_s": {"p95": 1.0}},
    ]
    assert held(levels, 1.5) == 4
