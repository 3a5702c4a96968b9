"""The scheduler and batched decoding: batched equals unbatched, no mixed-up answers, long-form
audio as good as openai-whisper's own transcribe(), backpressure, partial batches, fairness.

In-process tests drive the real engine and scheduler (tiny.en) on real clips; the HTTP tests
run a real server. Window cutting is checked on the long-form recordings themselves."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import whisper

from optim.audio import SAMPLE_RATE, decode_audio
from optim import decoding
from optim.decoding import BatchStats, audio_context
from optim.engine import WhisperEngine
from optim.registry import all_variants, parse_variant
from optim.scheduler import Scheduler, SchedulerConfig, lanes
from optim.scheduler.policy import POLICIES, Limits, QueuedWindow
from optim.types import ModelRef, TranscriptionOptions
from optim.windows import split_at_pauses
from tests.conftest import ENGLISH_READ, LONG_FORM, Server, english_wer

ENGLISH = TranscriptionOptions(language="en")


@pytest.fixture(scope="module")
def engine():
    engine = WhisperEngine({"tiny.en": "tiny.en"})
    engine.models.load("tiny.en")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def read_audio() -> list[np.ndarray]:
    return [decode_audio(c.data).samples for c in ENGLISH_READ]


def run_all(engine, config: SchedulerConfig, audio: list[np.ndarray], options: list[TranscriptionOptions], variant="flash"):
    """Submit every clip at once to a fresh scheduler; the transcripts and every batch's stats."""
    batches: list[BatchStats] = []

    async def go():
        scheduler = Scheduler(engine, config, on_batch=lambda ref, stats, s: batches.append(stats))
        try:
            return await asyncio.gather(*(scheduler.transcribe(tiny(variant), a, o) for a, o in zip(audio, options)))
        finally:
            await scheduler.close()

    return [transcript for transcript, _ in asyncio.run(go())], batches


def tiny(variant: str) -> ModelRef:
    return ModelRef("tiny.en", parse_variant(variant))


@pytest.mark.parametrize("variant", ["fp32", "flash", "int8+flash"])
def test_batched_equals_unbatched(engine, read_audio, variant):
    """Same words with the clips decoded together as one at a time, with prompts of different
    lengths in the same batch (30-s context, so that only batching differs). int8 too: its
    activations are quantized per row, so a row's rounding does not depend on its batch-mates."""
    options = [TranscriptionOptions(language="en", prompt="Printing." if i % 2 else None) for i in range(len(read_audio))]
    alone, alone_batches = run_all(engine, SchedulerConfig(max_batch_size=1, shorten_context=False), read_audio, options, variant)
    together, batches = run_all(engine, SchedulerConfig(max_batch_size=8, max_wait=0.5, shorten_context=False), read_audio, options, variant)
    assert {b.batch_size for b in alone_batches} == {1}
    assert max(b.batch_size for b in batches) == len(read_audio)  # really one batch
    assert [t.text for t in together] == [t.text for t in alone]
    assert english_wer([c.text for c in ENGLISH_READ], [t.text for t in together]) < 0.10


@pytest.mark.parametrize("variant", ["flash", "int8+flash"])
def test_dynamic_context_is_batch_invariant(engine, read_audio, variant):
    """With the dynamic audio context each row runs over its own context (its own length rounded
    up, at least 15 s), not the batch's longest: short clips batched with 20-30-s windows get the
    words they get alone. (A context set by the batch made a streamed request's first window,
    decoded alone, differ from the same window in the whole file's batch.)"""
    long_samples = decode_audio(LONG_FORM[0].data).samples
    pieces = [long_samples[start:end] for start, end in split_at_pauses(long_samples)[:3]]
    audio = [*read_audio, *pieces]
    options = [ENGLISH] * len(audio)
    alone, _ = run_all(engine, SchedulerConfig(max_batch_size=1, shorten_context=True), audio, options, variant)
    together, batches = run_all(engine, SchedulerConfig(max_batch_size=len(audio), max_wait=0.5, shorten_context=True), audio, options, variant)
    assert any(len(set(b.encoder_frames)) > 1 for b in batches)  # rows of different contexts shared a batch
    assert [t.text for t in together] == [t.text for t in alone]
    assert english_wer([c.text for c in ENGLISH_READ], [t.text for t in together[: len(read_audio)]]) < 0.10


# _ONE_THREAD: bitwise holds for one thread count. On several threads torch splits a reduction
# such as the log-softmax over the 51864-token vocabulary by the size of the batch, so a row's
# log-probability can move in the last digits with its batch-mates while its tokens do not. The
# server's lanes run one thread each on this 2-core machine.


@pytest.mark.parametrize("variant", ["flash", "int8+flash"])
def test_a_row_beside_a_longer_context_decodes_bitwise_as_alone(engine, clips, variant):
    """Each run of rows of one context attends over its own cross-attention keys/values: a 15-s
    context row beside a 30-s one gets, with int8, the very numbers it gets alone (tokens,
    log-probability, no-speech probability), in either order. Padded to the longest under a mask, SDPA rounded
    differently, and on base int8+flash a word changed (optim/decoding.py)."""
    model = engine.models.built(tiny(variant)).model
    tokenizer = whisper.tokenizer.get_tokenizer(False)
    jfk = decode_audio(clips["jfk"].data).samples
    long_samples = decode_audio(LONG_FORM[0].data).samples
    start, end = max(split_at_pauses(long_samples), key=lambda cut: cut[1] - cut[0])
    windows = [
        decoding.WindowInput(mel=whisper.log_mel_spectrogram(torch.from_numpy(a), model.dims.n_mels), language="en")
        for a in (jfk, long_samples[start:end])
    ]
    assert [audio_context(w.frames, True) for w in windows] == [1500, 3000]
    fused = parse_variant(variant).fused_attention
    with torch.inference_mode(), decoding.torch_threads(1):  # see _ONE_THREAD
        alone = [decoding.decode_batch(model, tokenizer, [w], True, fused_attention=fused)[0][0] for w in windows]
        pair, stats = decoding.decode_batch(model, tokenizer, windows, True, fused_attention=fused)
        swapped, _ = decoding.decode_batch(model, tokenizer, windows[::-1], True, fused_attention=fused)
    assert stats.encoder_frames == [1500, 3000]
    if variant == "int8+flash":  # every product row by row (optim/variants/int8.py): bitwise
        assert pair == alone and swapped == alone[::-1]
    else:  # float32 GEMMs round with the number of rows they multiply: the same tokens
        assert [o.tokens for o in pair] == [o.tokens for o in alone] == [o.tokens for o in swapped[::-1]]
    assert english_wer([clips["jfk"].text], [alone[0].text]) < 0.1


def test_rows_with_prompts_of_different_lengths_decode_bitwise_as_alone(engine, clips):
    """Each run of rows at one length attends over its own self-attention keys: with int8 a row
    with a short prompt beside one with a long prompt gets bitwise its numbers alone (padded
    to the longer prompt under a mask, its log-probabilities moved in the 5th digit)."""
    model = engine.models.built(tiny("int8+flash")).model
    tokenizer = whisper.tokenizer.get_tokenizer(False)
    mel = whisper.log_mel_spectrogram(torch.from_numpy(decode_audio(clips["jfk"].data).samples), model.dims.n_mels)
    prompts = [" Kennedy.", " The inaugural address of President John F. Kennedy, January 1961, in Washington."]
    windows = [decoding.WindowInput(mel=mel, language="en", prompt=tokenizer.encode(p)) for p in prompts]
    with torch.inference_mode(), decoding.torch_threads(1):  # see _ONE_THREAD
        alone = [decoding.decode_batch(model, tokenizer, [w], True, fused_attention=True)[0][0] for w in windows]
        pair, _ = decoding.decode_batch(model, tokenizer, windows, True, fused_attention=True)
        swapped, _ = decoding.decode_batch(model, tokenizer, windows[::-1], True, fused_attention=True)
    assert pair == alone and swapped == alone[::-1]
    assert english_wer([clips["jfk"].text] * 2, [o.text for o in alone]) < 0.1


@pytest.mark.parametrize("variant", ["flash", "int8+flash"])
def test_a_batch_that_starts_alone_lends_its_encoder_the_idle_cores(engine, read_audio, monkeypatch, variant):
    """With two lanes of one thread, a batch that is all the work there is (no other batch
    running, no other request admitted) encodes on two threads (alone_encoder_threads); any
    other batch on its lane's one. The decoder keeps the lane's thread either way, and the
    words are those of one lane."""
    options = [ENGLISH] * len(read_audio)
    torch.set_num_threads(1)
    one_lane, _ = run_all(engine, SchedulerConfig(max_batch_size=1, max_wait=0.0, shorten_context=True), read_audio, options, variant)
    seen: list[list] = []  # per batch, in start order: [another batch running?, threads asked, in the encoder, after]
    running: list[int] = []
    guard = threading.Lock()
    run_batch, encode_windows = engine.run_batch, decoding.encode_windows
    in_encoder = threading.local()

    def counted(*args):
        in_encoder.threads = torch.get_num_threads()
        return encode_windows(*args)

    def watched(ref, task, windows, *args, encoder_threads=None):
        with guard:
            entry = [bool(running), encoder_threads, None, None]
            seen.append(entry)
            running.append(1)
        try:
            return run_batch(ref, task, windows, *args, encoder_threads=encoder_threads)
        finally:
            with guard:
                running.pop()
                entry[2:] = [in_encoder.threads, torch.get_num_threads()]

    monkeypatch.setattr(engine, "run_batch", watched)
    monkeypatch.setattr(decoding, "encode_windows", counted)
    config = SchedulerConfig(max_batch_size=1, max_wait=0.0, shorten_context=True, lanes=2, alone_encoder_threads=2)
    first, _ = run_all(engine, config, read_audio[:1], options[:1], variant)  # the only request
    lone = len(seen)
    both, _ = run_all(engine, config, read_audio, options, variant)  # six at once
    assert seen[:lone] == [[False, 2, 2, 1]]
    assert seen[lone][:3] == [False, None, 1]  # nothing running yet, but five other requests admitted
    assert any(beside for beside, *_ in seen)  # some batch did start beside another
    for beside, asked, encoding, after in seen:
        assert encoding == (asked or 1) and after == 1  # the decoder, and the lane's next batch, on the lane's thread
        assert not (beside and asked)
    assert [t.text for t in first + both] == [t.text for t in one_lane[:1] + one_lane]


def test_lanes_run_batches_at_once_with_the_same_words(engine, read_audio, monkeypatch):
    """Two lanes: batches of one model run at the same time, each window still gets the words
    (and word times) it gets with one lane, and a batch with word timing never shares the model
    (openai-whisper's word timing hooks the model and turns its SDPA off while it runs)."""
    options = [TranscriptionOptions(language="en", word_timestamps=i == 1) for i in range(len(read_audio))]
    one_lane, _ = run_all(engine, SchedulerConfig(max_batch_size=1, max_wait=0.0, shorten_context=True), read_audio, options)
    running: list[bool] = []  # word timing? of each batch running now
    seen = {"most": 0, "timed_shared": False}
    guard = threading.Lock()
    run_batch = engine.run_batch

    overlap = threading.Event()  # set once two batches run at once

    def watched(ref, task, windows, *args, **kwargs):
        with guard:
            running.append(any(w.word_timestamps for w in windows))
            seen["most"] = max(seen["most"], len(running))
            seen["timed_shared"] |= len(running) > 1 and any(running)
            if len(running) > 1:
                overlap.set()
            wait = not overlap.is_set() and not running[-1]
        # Until two have overlapped, an untimed batch holds its lane until a second starts: on a
        # slow machine a batch can otherwise end before the next is dispatched (CI: most == 1).
        # Not forever: the batch the other lane took may be the timed one, which waits for it.
        if wait:
            overlap.wait(3)
        try:
            return run_batch(ref, task, windows, *args, **kwargs)
        finally:
            with guard:
                running.pop()

    monkeypatch.setattr(engine, "run_batch", watched)
    two_lanes, _ = run_all(engine, SchedulerConfig(max_batch_size=1, max_wait=0.0, shorten_context=True, lanes=2), read_audio * 2, options * 2)
    assert seen["most"] == 2  # two batches did run at once
    assert not seen["timed_shared"]
    for got in (two_lanes[: len(read_audio)], two_lanes[len(read_audio) :]):
        assert [t.text for t in got] == [t.text for t in one_lane]
        assert [(w.word, w.start, w.end) for t in got for s in t.segments for w in s.words] == [
            (w.word, w.start, w.end) for t in one_lane for s in t.segments for w in s.words
        ]
    assert any(s.words for s in one_lane[1].segments)


def test_a_word_timing_batch_is_not_starved_by_new_batches():
    """A batch that must run alone waits for the running ones, and from then on holds new ones
    back, so that a lane that keeps taking batches cannot make it wait until the queue drains
    (it did, and the lanes test above saw one batch at a time for the whole run)."""

    async def go():
        gate = lanes.LaneGate()
        await gate.enter(alone=False)  # a batch running
        timed = asyncio.create_task(gate.enter(alone=True))
        await asyncio.sleep(0.01)
        later = asyncio.create_task(gate.enter(alone=False))
        await asyncio.sleep(0.01)
        assert not timed.done() and not later.done()
        await gate.leave()
        await asyncio.wait_for(timed, 1)
        await asyncio.sleep(0.01)
        assert not later.done()  # held back while the timed one runs
        await gate.leave()
        await asyncio.wait_for(later, 1)
        given_up = asyncio.create_task(gate.enter(alone=True))  # waits behind `later`
        await asyncio.sleep(0.01)
        given_up.cancel()
        await asyncio.wait_for(gate.enter(alone=False), 1)  # no longer held back by it
        assert (gate.running, gate.waiting_alone) == (2, 0)

    asyncio.run(go())


def test_lanes_share_the_cores_on_cpu_and_one_runs_a_gpu():
    assert lanes.plan("cpu", 2) == (2, 1)
    assert lanes.plan("cpu", 16) == (2, 8)
    assert lanes.plan("cpu", 1) == (1, 1)
    assert lanes.plan("cuda", 16) == (1, 16)
    assert lanes.plan("cpu", 16, lanes=4) == (4, 4)
    assert lanes.plan("cpu", 2, lanes=1, threads=2) == (1, 2)
    assert SchedulerConfig(max_batch_audio=240.0, lanes=2).limits.max_batch_audio == 120.0  # one budget for all lanes


def test_sampled_rows_draw_the_same_alone_or_batched(engine, read_audio):
    """At a fixed temperature every token is sampled: each row has its own seeded sampler, so a
    window's words do not depend on what shares its batch (a shared generator's draws would),
    and the run repeats itself without any global seed."""
    options = [TranscriptionOptions(language="en", temperature=0.8)] * len(read_audio)
    alone, _ = run_all(engine, SchedulerConfig(max_batch_size=1, shorten_context=False), read_audio, options)
    together, batches = run_all(engine, SchedulerConfig(max_batch_size=8, max_wait=0.5, shorten_context=False), read_audio, options)
    assert max(b.batch_size for b in batches) == len(read_audio)
    assert [t.text for t in together] == [t.text for t in alone]
    torch.manual_seed(1234)  # the global generator plays no part
    again, _ = run_all(engine, SchedulerConfig(max_batch_size=8, max_wait=0.5, shorten_context=False), read_audio, options)
    assert [t.text for t in again] == [t.text for t in together]
    greedy, _ = run_all(engine, SchedulerConfig(max_batch_size=8, shorten_context=False), read_audio, [ENGLISH] * len(read_audio))
    assert [t.text for t in together] != [t.text for t in greedy]  # it did sample


@pytest.mark.parametrize("variant", [v.name for v in all_variants("cpu")])
def test_every_variant_decodes_in_batches(engine, read_audio, variant):
    texts, batches = run_all(engine, SchedulerConfig(max_batch_size=4, max_wait=0.5), read_audio[:4], [ENGLISH] * 4, variant)
    assert batches[0].batch_size == 4
    assert english_wer([c.text for c in ENGLISH_READ[:4]], [t.text for t in texts]) < 0.10


def test_a_row_that_runs_to_its_token_budget_fits_its_cache(engine, clips, monkeypatch):
    """The self-attention cache holds the longest prefix plus the tokens a row feeds back, and a
    shortened row feeds at most its budget less one: a row with a prompt that runs to a
    7-token budget fills the cache to its last slot (one slot fewer is an IndexError)."""
    monkeypatch.setattr(decoding, "BUDGET_BASE_TOKENS", 7)
    monkeypatch.setattr(decoding, "BUDGET_TOKENS_PER_SECOND", 0)
    model = engine.models.built(tiny("flash")).model
    tokenizer = whisper.tokenizer.get_tokenizer(False)
    samples = decode_audio(clips["jfk"].data).samples
    mel = whisper.log_mel_spectrogram(torch.from_numpy(samples), model.dims.n_mels)
    window = decoding.WindowInput(mel=mel, language="en", prompt=tokenizer.encode(" President Kennedy's inaugural address."))
    with torch.inference_mode():
        (output,), _ = decoding.decode_batch(model, tokenizer, [window], shorten_context=True, fused_attention=True)
    assert output.guard_tripped and len(output.tokens) == 7
    assert english_wer(["and so my fellow americans ask"], [output.text]) == 0  # a timestamp, then the clip's first words


def test_dynamic_context_keeps_the_words(engine, read_audio):
    """The encoder over 15 s instead of 30 s: the encoder padding shrinks, the words stay
    (README: en_read WER 7.36 → 7.02 % for tiny.en)."""
    full, full_batches = run_all(engine, SchedulerConfig(max_batch_size=8, shorten_context=False), read_audio, [ENGLISH] * 6)
    short, short_batches = run_all(engine, SchedulerConfig(max_batch_size=8, shorten_context=True), read_audio, [ENGLISH] * 6)
    assert {f for b in full_batches for f in b.encoder_frames} == {3000}
    assert {f for b in short_batches for f in b.encoder_frames} == {1500}
    assert short_batches[0].encoder_padding < full_batches[0].encoder_padding - 0.2
    references = [c.text for c in ENGLISH_READ]
    assert english_wer(references, [t.text for t in short]) <= english_wer(references, [t.text for t in full]) + 0.02


def plan_batches(policy: str, durations: list[float], max_batch_size: int = 4) -> list[list[float]]:
    """The batches the policy forms from windows of these durations, all waiting (no model and
    no event loop: the policy alone; the load test measures it end to end)."""
    queue = [QueuedWindow(d, enqueued=i * 1e-3) for i, d in enumerate(durations)]  # arrival order = list order
    chooser, limits = POLICIES[policy](), Limits(max_batch_size=max_batch_size, max_wait=0.0)
    planned = []
    while True:
        choice = chooser.choose({"tiny.en:flash": queue}, now=1.0, limits=limits, seconds_per_window=0.5)
        if not choice.batch:
            return planned
        queue = [w for w in queue if w not in choice.batch]
        planned.append([w.padded_seconds for w in choice.batch])


def mean_padding(batches: list[list[float]], kind: str) -> float:
    """Mean encoder padding ratio of planned batches: `encoder_padding` (against the dynamic
    audio context actually run) or `length_padding` (against the batch's longest window)."""
    ratios = []
    for durations in batches:
        frames = [round(d * 100) for d in durations]
        if kind == "batch_context_padding":  # one context for the batch, its longest window's
            ratios.append(1 - sum(frames) / (len(frames) * audio_context(max(frames), True)))
        else:
            ratios.append(getattr(BatchStats(len(frames), [audio_context(f, True) for f in frames], frames, [1]), kind))
    return float(np.mean(ratios))


def test_duration_buckets_cut_padding_against_first_come():
    """Windows of mixed lengths arriving in mixed order: grouping by duration wastes far less
    encoder work on padding than batching them in arrival order, batch size for batch size."""
    durations = [n / 100 for n in np.random.default_rng(0).integers(200, 3000, size=64)]
    by_duration, first_come = plan_batches("duration", durations), plan_batches("fifo", durations)
    assert [len(b) for b in by_duration] == [len(b) for b in first_come] == [4] * 16
    assert first_come[0] == durations[:4]  # arrival order
    assert all(max(b) - min(b) < 8 for b in by_duration)  # similar lengths together
    # the grouping itself: over half the padding gone
    assert mean_padding(by_duration, "length_padding") < 0.5 * mean_padding(first_come, "length_padding")
    # the encoder's real input: each row runs over its own context, so its padding (the 15-s
    # minimum, the rounding up) is the same whatever the grouping, and below a context set by
    # the batch's longest window, which was first-come's price
    assert pooled_encoder_padding(by_duration) == pytest.approx(pooled_encoder_padding(first_come))
    assert mean_padding(first_come, "encoder_padding") < 0.7 * mean_padding(first_come, "batch_context_padding")


def pooled_encoder_padding(batches: list[list[float]]) -> float:
    """The encoder padding of all the batches together (1 − Σ frames / Σ contexts)."""
    frames = [round(d * 100) for b in batches for d in b]
    return 1 - sum(frames) / sum(audio_context(f, True) for f in frames)


def test_a_partial_batch_runs_after_the_maximum_wait(engine, read_audio):
    async def go(max_wait):
        scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=8, max_wait=max_wait))
        try:
            _, timing = await scheduler.transcribe(tiny("flash"), read_audio[0], ENGLISH)
            return timing
        finally:
            await scheduler.close()

    waited = asyncio.run(go(0.8))
    assert waited.batch_size == 1
    assert 0.8 <= waited.queue_seconds < 1.3  # waited for company, then ran alone
    assert asyncio.run(go(0.0)).queue_seconds < 0.3


def test_a_short_request_is_not_held_behind_a_long_file(engine, clips):
    long_audio = decode_audio(clips["lj-LJ001-0001-0032-concat"].data).samples  # 237 s: 9 windows
    short_audio = decode_audio(clips["jfk"].data).samples

    async def go():
        scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=2, max_wait=0.0))
        finished = {}

        async def timed(name, audio, delay):
            await asyncio.sleep(delay)
            await scheduler.transcribe(tiny("int8+flash"), audio, ENGLISH)
            finished[name] = time.perf_counter()

        try:
            await asyncio.gather(timed("long", long_audio, 0), timed("short", short_audio, 0.2))
        finally:
            await scheduler.close()
        return finished

    finished = asyncio.run(go())
    assert finished["short"] < finished["long"]


def test_windows_cover_the_audio_and_cut_in_pauses():
    for clip in LONG_FORM:
        samples = decode_audio(clip.data).samples
        windows = split_at_pauses(samples)
        assert windows[0][0] == 0 and windows[-1][1] == len(samples)
        assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))  # contiguous
        assert all(0 < end - start <= 30 * SAMPLE_RATE for start, end in windows)
        frame_energy = np.square(samples[: len(samples) // 160 * 160]).reshape(-1, 160).mean(axis=1)
        for _, cut in windows[:-1]:  # each cut lies in a quiet stretch, not mid-word
            around = frame_energy[cut // 160 - 5 : cut // 160 + 5].mean()
            assert around < np.median(frame_energy) * 0.25, (clip.id, cut / SAMPLE_RATE)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("clip_id", ["lj-LJ001-0001-0032-concat", "mfa-michaelandsickmichael"])
def test_long_form_matches_openai_whisper_transcribe(engine, clips, tiny_model, clip_id):
    """Independent windows cut at pauses, batched, against openai-whisper's sequential
    transcribe() on the same weights: within 1 WER point."""
    clip = clips[clip_id]
    samples = decode_audio(clip.data).samples
    torch.manual_seed(0)  # temperature fallback samples (both sides): the same run every time
    (ours,), batches = run_all(engine, SchedulerConfig(max_batch_size=8), [samples], [ENGLISH])
    assert max(b.batch_size for b in batches) > 1  # the file's windows ran together
    from optim.registry import build_variant

    reference_model = build_variant(tiny_model, parse_variant("flash"))
    torch.manual_seed(0)
    with torch.inference_mode():
        theirs = whisper.transcribe(reference_model, torch.from_numpy(samples), language="en", fp16=False, verbose=None)
    ours_wer = english_wer([clip.text], [ours.text])
    theirs_wer = english_wer([clip.text], [theirs["text"]])
    print(f"{clip_id}: WER ours {ours_wer:.4f}, openai-whisper {theirs_wer:.4f}")
    assert ours_wer <= theirs_wer + 0.01, (ours_wer, theirs_wer)
    assert ours.segments[-1].end <= clip.duration
    assert all(a.start <= b.start for a, b in zip(ours.segments, ours.segments[1:]))  # in order


def test_concurrent_requests_never_swap_answers(server):
    """Different clips at once over HTTP, batched together: each answer is its own clip's."""
    clips = ENGLISH_READ

    def post(clip):
        with httpx.Client(base_url=server.url, timeout=300) as client:
            response = client.post(
                "/v1/audio/transcriptions",
                files={"file": (clip.path.name, clip.data)},
                data={"model": "tiny.en", "language": "en", "response_format": "verbose_json"},
            )
        assert response.status_code == 200, response.text
        return {**response.json(), "batch_size": float(response.headers["X-Batch-Size"])}

    with concurrent.futures.ThreadPoolExecutor(len(clips) * 2) as pool:
        answers = list(pool.map(post, clips * 2))
    assert max(a["batch_size"] for a in answers) > 1  # they did share batches
    for clip, answer in zip(clips * 2, answers):
        assert english_wer([clip.text], [answer["text"]]) < 0.2, (clip.id, answer["text"])
        assert answer["duration"] == pytest.approx(clip.duration, abs=0.05)


@pytest.fixture(scope="module")
def small_queue_server():
    server = Server(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", MAX_QUEUE="1", MAX_BATCH_SIZE="1").wait_ready()
    yield server
    server.stop()


def test_a_full_queue_answers_503_with_retry_after(small_queue_server, clips):
    clip = clips["lj-LJ001-0001-0032-concat"]  # long enough to keep the one slot busy

    def post(_):
        with httpx.Client(base_url=small_queue_server.url, timeout=300) as client:
            return client.post("/v1/audio/transcriptions", files={"file": ("long.flac", clip.data)}, data={"language": "en"})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(post, range(3)))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(ok) >= 1 and len(refused) >= 1, [r.status_code for r in responses]
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "server_overloaded"
    assert english_wer([clip.text], [ok[0].json()["text"]]) < 0.15


def test_a_failing_row_fails_only_its_own_request(engine, read_audio):
    """NaN samples (the edge refuses them: optim/audio.py; here they reach the scheduler
    directly) make a row's sampling fail. The batch is re-run one window at a time, so only that
    request fails and its batch-mates get their words."""
    poisoned = read_audio[0].copy()
    poisoned[::7] = np.nan
    audio = [poisoned, *read_audio[1:4]]

    async def go():
        scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=8, max_wait=0.5))
        try:
            return await asyncio.gather(
                *(scheduler.transcribe(tiny("flash"), a, ENGLISH) for a in audio), return_exceptions=True
            )
        finally:
            await scheduler.close()

    results = asyncio.run(go())
    assert isinstance(results[0], Exception)
    for clip, result in zip(ENGLISH_READ[1:4], results[1:]):
        assert not isinstance(result, Exception), result
        assert english_wer([clip.text], [result[0].text]) <= 0.2


def test_retry_after_follows_the_measured_drain_rate():
    from optim.scheduler.core import MAX_RETRY_AFTER_S, drain_seconds

    # 40 windows finished over the last 20 s: 2 a second; 30 ahead take 15 s
    finished = [(100.0 + t, 4) for t in range(0, 20, 2)]
    assert drain_seconds(30, finished, now=120.0, estimated_rate=100.0) == 15
    # a slower server asks clients to wait longer for the same queue
    assert drain_seconds(30, finished[::2], now=120.0, estimated_rate=100.0) == 30
    # before two batches have finished, the per-window estimate; always within [1, MAX_RETRY_AFTER_S]
    assert drain_seconds(10, [], now=0.0, estimated_rate=2.0) == 5
    assert drain_seconds(0, finished, now=120.0, estimated_rate=1.0) == 1
    assert drain_seconds(10_000, finished, now=120.0, estimated_rate=1.0) == MAX_RETRY_AFTER_S
