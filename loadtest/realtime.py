"""`python -m loadtest.realtime`: N concurrent realtime sessions (GET /v1/realtime, OpenAI's
Realtime API, transcription) streaming real read speech at real-time pace, and what each turn
costs the speaker in waiting.

Each session streams its own multi-utterance recording: clips of `en_read` in a seeded order,
joined by 1 s of silence, as 24 kHz 16-bit PCM in CHUNK_MS chunks sent on a real-time clock, with
server_vad turn detection (OpenAI's defaults: threshold 0.5, 300 ms padding, 500 ms silence).
Sessions start a random fraction of a second apart. Per turn (a committed item):

- **end of turn**: from sending the audio chunk in which the server's VAD heard the turn end
  (the chunk holding `speech_stopped.audio_end_ms`, which is 500 ms of silence after the last
  word) to receiving its `completed` transcript;
- **first delta**: from sending the chunk in which the speech started (`speech_started.audio_start_ms`
  plus the 300 ms prefix padding) to receiving the turn's first `delta`; `interim` counts the turns
  whose first delta came before the turn ended (from interim decodes, not the final one);
- **WER** of each session's completed transcripts, in order, against its clips' references
  (corpus WER over all sessions, Whisper's English normalizer).

Per level it also reads the server's /metrics around the run: VAD CPU seconds per audio second,
interim decodes run and skipped (the engine saturated), and the process's CPU. The largest level
whose p95 end of turn is within `--target-p95` (1.5 s) is the number of sessions held.

Speaks WebSocket and HTTP only (the `websockets` library, httpx); imports neither app nor optim.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from loadtest import metrics, stats
from loadtest.cli import env_option, run_command
from loadtest.report import machine_info
from loadtest.server import ServerConfig, spawn_server
from loadtest.workload import DEFAULT_EVAL_DIR, REFERENCED_SET, read_manifest

RATE = 24000  # OpenAI's audio/pcm rate
CHUNK_MS = 40
GAP_S = 1.0  # silence between clips
LEAD_S = 0.5
TAIL_S = 2.0  # silence after the last clip, so that its turn ends
PREFIX_PADDING_MS = 300
RESAMPLER_MS = 5  # the server's resampler holds back 4.5 ms: the audio through T is complete one chunk later at most
TARGET_P95_S = 1.5
SETTLE_S = 30.0  # after the last chunk, how long a session waits for its last transcripts
WARM_UP_S = 6.0


# ---------------------------------------------------------------- the streams
def decode_pcm(path: Path, rate: int = RATE) -> bytes:
    """A clip as 16-bit little-endian mono PCM (PyAV: FFmpeg's decoder and resampler)."""
    import av

    out = []
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in container.decode(audio=0):
            out += [f.to_ndarray().astype("<i2").tobytes() for f in resampler.resample(frame)]
        out += [f.to_ndarray().astype("<i2").tobytes() for f in resampler.resample(None)]
    return b"".join(out)


def silence(seconds: float) -> bytes:
    return bytes(2 * int(seconds * RATE))


@dataclass(frozen=True)
class Stream:
    id: str
    pcm: bytes
    clips: list[str]
    references: list[str]

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE

    @property
    def speech_seconds(self) -> float:
        return self.seconds - LEAD_S - TAIL_S - GAP_S * (len(self.clips) - 1)


def build_streams(count: int, seconds: float, eval_dir: Path, seed: int) -> list[Stream]:
    """`count` recordings of at least `seconds` each: en_read clips (English, with references) in
    an order seeded per stream, joined by GAP_S of silence."""
    entries = sorted((e for e in read_manifest(eval_dir / REFERENCED_SET) if e.reference and e.lang in (None, "en")), key=lambda e: e.id)
    if not entries:
        raise ValueError(f"no English clips with references in {eval_dir / REFERENCED_SET}")
    audio: dict[str, bytes] = {}
    streams = []
    for n in range(count):
        order = list(entries)
        random.Random(seed * 1000 + n).shuffle(order)
        parts, clips, references, total = [silence(LEAD_S)], [], [], LEAD_S + TAIL_S
        for entry in order * 4:  # (a set shorter than `seconds` repeats)
            if total >= seconds:
                break
            if entry.id not in audio:
                audio[entry.id] = decode_pcm(entry.path)
            if clips:
                parts.append(silence(GAP_S))
                total += GAP_S
            parts.append(audio[entry.id])
            clips.append(entry.id)
            references.append(entry.reference)
            total += len(audio[entry.id]) / 2 / RATE
        parts.append(silence(TAIL_S))
        streams.append(Stream(f"stream-{n}", b"".join(parts), clips, references))
    return streams


# ---------------------------------------------------------------- one session
@dataclass
class SessionResult:
    stream: Stream
    sent: list[float] = field(default_factory=list)  # send time of each chunk
    events: list[tuple[float, dict]] = field(default_factory=list)
    error: str | None = None
    served_as: str | None = None  # the session's transcription model, as the server names it


def ws_url(url: str, model: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/v1/realtime?intent=transcription&model={model}"


async def run_session(
    url: str, model: str, stream: Stream, delay: float, chunk_ms: int = CHUNK_MS, api_key: str | None = None, language: str = "en"
) -> SessionResult:
    """Stream `stream` at real time through one session; every server event with its receipt time."""
    import websockets

    result = SessionResult(stream)
    await asyncio.sleep(delay)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    step = RATE * 2 * chunk_ms // 1000
    try:
        async with websockets.connect(ws_url(url, model), additional_headers=headers, max_size=None) as ws:
            created = json.loads(await ws.recv())
            if created["type"] != "session.created":
                raise RuntimeError(f"the server answered {created}")
            await ws.send(json.dumps({
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": RATE},
                    "transcription": {"model": model, "language": language},
                    "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": PREFIX_PADDING_MS,
                                       "silence_duration_ms": 500},
                }}},
            }))
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "error":
                    raise RuntimeError(f"session.update refused: {event['error']}")
                if event["type"] == "session.updated":
                    result.served_as = event["session"]["audio"]["input"]["transcription"]["model"]
                    break

            async def send() -> None:
                start = time.perf_counter()
                for n, i in enumerate(range(0, len(stream.pcm), step)):
                    await asyncio.sleep(max(0.0, start + n * chunk_ms / 1000 - time.perf_counter()))
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(stream.pcm[i : i + step]).decode()}))
                    result.sent.append(time.perf_counter())

            sender = asyncio.create_task(send())
            pending: set[str] = set()
            settle_until = None
            while True:
                if sender.done() and settle_until is None:
                    sender.result()
                    settle_until = time.perf_counter() + SETTLE_S
                if settle_until is not None and (not pending or time.perf_counter() > settle_until):
                    break
                try:
                    message = await asyncio.wait_for(ws.recv(), 0.25)
                except asyncio.TimeoutError:
                    continue
                event = json.loads(message)
                result.events.append((time.perf_counter(), event))
                kind = event["type"]
                if kind == "input_audio_buffer.committed":
                    pending.add(event["item_id"])
                elif kind.endswith(".completed") or kind.endswith(".failed"):
                    pending.discard(event["item_id"])
            await sender
    except Exception as e:  # a refused or broken session is a result too
        result.error = f"{type(e).__name__}: {e}"
    return result


# ---------------------------------------------------------------- turns
@dataclass(frozen=True)
class TurnResult:
    item_id: str
    start_ms: int | None
    end_ms: int | None
    end_of_turn_s: float | None  # end-of-turn chunk sent → completed received
    first_delta_s: float | None  # speech-start chunk sent → first delta received
    interim: bool  # the first delta came before the turn ended
    vad_lag_s: float | None  # end-of-turn chunk sent → speech_stopped received: how far the server's audio path lags
    transcript: str | None
    failed: bool


def chunk_sent(result: SessionResult, audio_ms: float, chunk_ms: int) -> float | None:
    """When the chunk that completed the stream's audio up to `audio_ms` was sent."""
    if not result.sent:
        return None
    index = int((audio_ms + RESAMPLER_MS) // chunk_ms)
    return result.sent[min(max(index, 0), len(result.sent) - 1)]


def turns(result: SessionResult, chunk_ms: int = CHUNK_MS) -> list[TurnResult]:
    by_item: dict[str, dict] = {}
    order = []
    for t, event in result.events:
        item = event.get("item_id")
        if item is None:
            continue
        record = by_item.setdefault(item, {})
        kind = event["type"]
        if kind == "input_audio_buffer.speech_started":
            record["start_ms"] = event["audio_start_ms"]
        elif kind == "input_audio_buffer.speech_stopped":
            record["end_ms"], record["stopped_at"] = event["audio_end_ms"], t
        elif kind == "input_audio_buffer.committed":
            order.append(item)
        elif kind.endswith(".delta"):
            record.setdefault("first_delta_at", t)
        elif kind.endswith(".completed"):
            record["completed_at"], record["transcript"] = t, event["transcript"]
        elif kind.endswith(".failed"):
            record["failed"] = True
    out = []
    for item in order:
        r = by_item[item]
        end_sent = chunk_sent(result, r["end_ms"], chunk_ms) if "end_ms" in r else None
        start_sent = chunk_sent(result, r["start_ms"] + PREFIX_PADDING_MS, chunk_ms) if "start_ms" in r else None
        eot = r["completed_at"] - end_sent if "completed_at" in r and end_sent is not None else None
        first = r["first_delta_at"] - start_sent if "first_delta_at" in r and start_sent is not None else None
        interim = "first_delta_at" in r and "stopped_at" in r and r["first_delta_at"] < r["stopped_at"]
        lag = r["stopped_at"] - end_sent if "stopped_at" in r and end_sent is not None else None
        out.append(TurnResult(item, r.get("start_ms"), r.get("end_ms"), eot, first, interim, lag, r.get("transcript"), r.get("failed", False)))
    return out


def summarize_level(results: list[SessionResult], wall_s: float, server: dict) -> dict:
    all_turns = [(res, t) for res in results for t in turns(res)]
    eot = [t.end_of_turn_s for _, t in all_turns if t.end_of_turn_s is not None]
    first = [t.first_delta_s for _, t in all_turns if t.first_delta_s is not None]
    lag = [t.vad_lag_s for _, t in all_turns if t.vad_lag_s is not None]
    references = [" ".join(res.stream.references) for res in results if res.error is None]
    hypotheses = [" ".join(t.transcript or "" for t in turns(res)) for res in results if res.error is None]
    return {
        "sessions": len(results),
        "refused_or_broken": sum(res.error is not None for res in results),
        "errors": sorted({res.error for res in results if res.error}),
        "audio_s_per_session": round(statistics.mean(res.stream.seconds for res in results), 1),
        "turns": len(all_turns),
        "clips": sum(len(res.stream.clips) for res in results),
        "completed": sum(t.transcript is not None for _, t in all_turns),
        "failed": sum(t.failed for _, t in all_turns),
        "end_of_turn_s": stats.latency_percentiles(eot) | {"max": max(eot) if eot else None, "mean": statistics.mean(eot) if eot else None},
        "first_delta_s": stats.latency_percentiles(first),
        "vad_lag_s": stats.latency_percentiles(lag),
        "interim_first_delta_share": (sum(t.interim for _, t in all_turns) / len(all_turns)) if all_turns else None,
        "wer": stats.word_error_rate(references, hypotheses) if references else None,
        "wall_s": round(wall_s, 1),
        "server": server,
    }


# ---------------------------------------------------------------- server figures
REALTIME_COUNTERS = {
    "audio_s": "whisper_realtime_audio_seconds_total",
    "vad_cpu_s": "whisper_realtime_vad_cpu_seconds_total",
    "process_cpu_s": "process_cpu_seconds_total",
    "turn_latency_sum": "whisper_realtime_turn_latency_seconds_sum",
    "turn_latency_count": "whisper_realtime_turn_latency_seconds_count",
}


def scrape(url: str) -> dict[str, float]:
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    samples = metrics.parse_samples(text)
    values = {key: sum(s.value for s in samples if s.name == name) for key, name in REALTIME_COUNTERS.items()}
    for outcome in ("run", "skipped", "preempted"):
        values[f"interim_{outcome}"] = sum(
            s.value for s in samples if s.name == "whisper_realtime_interim_decodes_total" and s.labels.get("outcome") == outcome
        )
    return values


def host_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine so far (Linux /proc/stat), or None."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def host_cores_busy(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """Cores the whole machine kept busy between two readings: this server, this client, and
    anything else running (other work on a shared machine shows here)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    import os

    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def server_figures(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    if not before or not after:
        return {}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {
        "audio_s": round(d["audio_s"], 1),
        "vad_cpu_s_per_audio_s": d["vad_cpu_s"] / d["audio_s"] if d["audio_s"] else None,
        "interim_run": int(d["interim_run"]),
        "interim_skipped": int(d["interim_skipped"]),
        "interim_preempted": int(d["interim_preempted"]),
        "cores_busy": d["process_cpu_s"] / wall_s if wall_s else None,
        "turn_latency_mean_s": d["turn_latency_sum"] / d["turn_latency_count"] if d["turn_latency_count"] else None,
    }


async def run_level(url: str, model: str, streams: list[Stream], seed: int, chunk_ms: int, api_key: str | None) -> dict:
    rng = random.Random(seed)
    before, host_before, client_before = scrape(url), host_cpu(), time.process_time()
    start = time.perf_counter()
    results = await asyncio.gather(*(run_session(url, model, s, rng.uniform(0, 1.0), chunk_ms, api_key) for s in streams))
    wall = time.perf_counter() - start
    server = server_figures(before, scrape(url), wall)
    server["host_cores_busy"] = host_cores_busy(host_before, host_cpu())
    server["client_cores_busy"] = (time.process_time() - client_before) / wall
    summary = summarize_level(list(results), wall, server)
    summary["transcripts"] = {
        res.stream.id: {"clips": res.stream.clips, "text": [t.transcript for t in turns(res, chunk_ms)]} for res in results
    }
    return summary


# ---------------------------------------------------------------- report
def held(levels: list[dict], target: float) -> int | None:
    """The largest level whose sessions were all served and whose p95 end of turn is within `target`."""
    ok = [lv["sessions"] for lv in levels if not lv["refused_or_broken"] and lv["end_of_turn_s"]["p95"] is not None
          and lv["end_of_turn_s"]["p95"] <= target]
    return max(ok) if ok else None


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(document: dict) -> str:
    m = document["machine"]
    lines = [
        f"# Realtime sessions: end-of-turn latency under load",
        "",
        f"`{document['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores), python {m['python']}, torch {m['torch']}; {document['date']}.",
        f"Each session streams its own recording of en_read clips joined by {GAP_S:g} s of silence (about "
        f"{document['settings']['seconds']:g} s), 24 kHz PCM in {document['settings']['chunk_ms']} ms chunks at real time, server_vad "
        "(threshold 0.5, 300 ms padding, 500 ms silence). End of turn: the chunk in which the VAD heard the turn end "
        "(500 ms after the last word) sent → `completed` received. First delta: the chunk in which speech began sent → "
        "the turn's first `delta` received; `interim`: share of turns whose first delta came before the turn ended.",
        "",
    ]
    if document.get("note"):
        lines += [document["note"], ""]
    for target in document["targets"]:
        lines += [f"## {target['target']} (served as {target.get('served_as') or 'n/a'})", ""]
        if target.get("command"):  # measured by another run than the document's command
            lines += [f"`{target['command']}`" + (f", {target['date']}" if target.get("date") else ""), ""]
        lines += [
            "| sessions | turns | completed | end of turn p50 (s) | p95 (s) | max (s) | first delta p50 (s) | p95 (s) | interim | WER % | "
            "VAD CPU ms per audio s | interim decodes run / skipped / preempted | cores busy: server / client / whole machine |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for lv in target["levels"]:
            e, f, s = lv["end_of_turn_s"], lv["first_delta_s"], lv["server"]
            vad = s.get("vad_cpu_s_per_audio_s")
            lines.append(
                f"| {lv['sessions']}{' (' + str(lv['refused_or_broken']) + ' refused)' if lv['refused_or_broken'] else ''} "
                f"| {lv['turns']} | {lv['completed']} | {_num(e['p50'])} | {_num(e['p95'])} | {_num(e['max'])} | {_num(f['p50'])} "
                f"| {_num(f['p95'])} | {_num(lv['interim_first_delta_share'] and 100 * lv['interim_first_delta_share'], 0)} % "
                f"| {_num(lv['wer'] and 100 * lv['wer'])} | {_num(vad and 1000 * vad)} "
                f"| {s.get('interim_run', 'n/a')} / {s.get('interim_skipped', 'n/a')} / {s.get('interim_preempted', 'n/a')} "
                f"| {_num(s.get('cores_busy'))} / {_num(s.get('client_cores_busy'))} / {_num(s.get('host_cores_busy'))} |"
            )
        lines += ["", f"Sessions held at p95 end of turn ≤ {document['settings']['target_p95']:g} s: **{target['held'] or 'none'}**.", ""]
    return "\n".join(lines)


def chart(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in document["targets"]:
        levels = [lv for lv in target["levels"] if lv["end_of_turn_s"]["p95"] is not None]
        x = [lv["sessions"] for lv in levels]
        ax1.plot(x, [lv["end_of_turn_s"]["p95"] for lv in levels], "o-", label=f"{target['target']} p95")
        ax1.plot(x, [lv["end_of_turn_s"]["p50"] for lv in levels], "o--", alpha=0.6, label=f"{target['target']} p50")
        ax2.plot(x, [lv["first_delta_s"]["p95"] for lv in levels], "o-", label=f"{target['target']} p95")
        ax2.plot(x, [lv["first_delta_s"]["p50"] for lv in levels], "o--", alpha=0.6, label=f"{target['target']} p50")
    ax1.axhline(document["settings"]["target_p95"], color="grey", lw=0.8, ls=":")
    for ax, title in ((ax1, "end of turn → completed (s)"), (ax2, "speech start → first delta (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(document["settings"]["levels"], [str(n) for n in document["settings"]["levels"]])
        ax.set_xlabel("concurrent realtime sessions")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Realtime sessions at real-time pace ({document['machine']['cores']}-core {document['machine']['cpu'][:40]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.realtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="measure a running server (default: spawn `python -m app` per target)")
    parser.add_argument("--targets", default="base", help="comma-separated model[:variant] to measure, one server each (default: base)")
    parser.add_argument("--sessions", default="1,4,8,16", help="comma-separated session counts (default: 1,4,8,16)")
    parser.add_argument("--seconds", type=float, default=75.0, help="audio per session, about (default: 75)")
    parser.add_argument("--chunk-ms", type=int, default=CHUNK_MS, help=f"audio per append, 20-100 (default: {CHUNK_MS})")
    parser.add_argument("--target-p95", type=float, default=TARGET_P95_S, help="p95 end of turn that counts as held (default: 1.5 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-dir", type=Path, default=DEFAULT_EVAL_DIR)
    parser.add_argument("--api-key", help="sent as Authorization: Bearer (a server with API_KEYS)")
    parser.add_argument("--server-env", action="append", type=env_option, default=[], metavar="KEY=VALUE",
                        help="a setting for every spawned server (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--name", default="realtime")
    return parser


async def measure_target(url: str, model: str, levels: list[int], streams: list[Stream], args) -> tuple[list[dict], str | None]:
    # Warm-up: the VAD model loads, the variant is built, the first decodes pay their one-time costs.
    warm = Stream("warm-up", streams[0].pcm[: 2 * int(WARM_UP_S * RATE)] + silence(TAIL_S), streams[0].clips[:1], [])
    warmed = await run_session(url, model, warm, 0.0, args.chunk_ms, args.api_key)
    if warmed.error:
        raise RuntimeError(f"the warm-up session failed: {warmed.error}")
    out = []
    for n in levels:
        print(f"  {n} sessions ...", file=sys.stderr, flush=True)
        level = await run_level(url, model, streams[:n], args.seed + n, args.chunk_ms, args.api_key)
        e = level["end_of_turn_s"]
        print(f"  {n} sessions: {level['turns']} turns, end of turn p50 {_num(e['p50'])} p95 {_num(e['p95'])} s, "
              f"VAD lag p95 {_num(level['vad_lag_s']['p95'])} s, "
              f"first delta p50 {_num(level['first_delta_s']['p50'])} s, WER {_num(level['wer'] and 100 * level['wer'])} %, "
              f"{level['refused_or_broken']} refused", file=sys.stderr, flush=True)
        out.append(level)
    return out, warmed.served_as


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    levels = sorted({int(n) for n in args.sessions.split(",") if n.strip()})
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not 20 <= args.chunk_ms <= 100:
        print("--chunk-ms must be 20-100", file=sys.stderr)
        return 2
    streams = build_streams(max(levels), args.seconds, args.eval_dir, args.seed)
    document = {
        "command": shlex.join(["python", "-m", "loadtest.realtime", *argv]),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"levels": levels, "seconds": args.seconds, "chunk_ms": args.chunk_ms, "target_p95": args.target_p95,
                     "seed": args.seed, "server_env": dict(args.server_env)},
        "targets": [],
    }
    for target in targets:
        model_id = target.split(":", 1)[0]
        print(f"{target}:", file=sys.stderr, flush=True)
        if args.url:
            measured, served = asyncio.run(measure_target(args.url, target, levels, streams, args))
        else:
            config = ServerConfig("realtime", {"MAX_REALTIME_SESSIONS": str(max(levels)), **dict(args.server_env)})
            variants = [target.split(":", 1)[1]] if ":" in target else []
            log = args.out / f"{args.name}-{target.replace(':', '_')}.log"
            with spawn_server(model_id, variants, config, {}, log) as server:
                measured, served = asyncio.run(measure_target(server.url, target, levels, streams, args))
            log.unlink(missing_ok=True)
        document["targets"].append({"target": target, "served_as": served, "levels": measured, "held": held(measured, args.target_p95)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(document) + "\n")
    try:
        chart(document, args.out / f"{args.name}.png")
    except ImportError:
        pass
    print(markdown(document))
    return 0


if __name__ == "__main__":
    run_command(main)
