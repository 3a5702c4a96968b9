"""The inference engine: a request's audio cut into windows, a batch of windows decoded into
segments (with the fallback policy's retries), and a request's results assembled in order.

It knows nothing of HTTP or queues (the scheduler decides what runs together); the models it
runs come from its `ModelStore` (optim/models.py). Batches run on the model's worker thread.
"""

from __future__ import annotations

import asyncio
import math
import struct
import zlib
from dataclasses import replace
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import whisper
import whisper.timing
from whisper.audio import HOP_LENGTH
from whisper.model import Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer, get_tokenizer

from optim import fallback
from optim.audio import SAMPLE_RATE
from optim.decoding import BatchStats, WindowInput, WindowOutput, decode_batch, split_segments
from optim.errors import UnsupportedOption
from optim.memory import limit_malloc_arenas, trim_heap
from optim.models import LoadedModel, ModelStore
from optim.types import ModelRef, Segment, Task, Transcript, TranscriptionOptions, Window, WindowResult, Word
from optim.windows import split_at_pauses


def normalize_language(language: str | None) -> str | None:
    """Accept an ISO code ("en") or an English name ("English"); None means detect."""
    if not language:
        return None
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise UnsupportedOption(f"unknown language {language!r}: use an ISO-639-1 code such as 'en' or 'de'", "language")


class WhisperEngine:
    """Transcribes with the models of its store, window by window, batch by batch."""

    def __init__(
        self,
        sources: dict[str, str | Path] | ModelStore,
        device: str = "auto",
        silence_peak: float = 1e-3,
        **store_options,
    ):
        """`sources` (id -> bundled name or path) with `device` and ModelStore's options, or a store."""
        limit_malloc_arenas()
        self.models = sources if isinstance(sources, ModelStore) else ModelStore(sources, device, **store_options)
        self.silence_peak = silence_peak

    def close(self) -> None:
        self.models.close()

    # ---------------------------------------------------------------- a request
    def check(self, ref: ModelRef, options: TranscriptionOptions) -> None:
        """Reject options the model cannot honour before any audio work is done."""
        self.models.check_student(ref)
        self.models.check_build(ref)
        language = normalize_language(options.language)
        loaded = self.models.loaded.get(ref.model)
        if loaded is None:
            return  # checked again once loaded
        if not loaded.multilingual:
            if options.task == "translate":
                raise UnsupportedOption(f"model {ref.model!r} is English-only and cannot translate; use a multilingual model", "model")
            if language not in (None, "en"):
                raise UnsupportedOption(f"model {ref.model!r} is English-only; it cannot transcribe language {language!r}", "language")

    async def ensure_loaded(self, ref: ModelRef, options: TranscriptionOptions) -> LoadedModel:
        """The loaded model, loading a served one that was not preloaded (off the event loop)."""
        self.check(ref, options)
        loaded = self.models.loaded.get(ref.model)
        if loaded is None:
            loaded = await asyncio.get_running_loop().run_in_executor(None, self.models.load, ref.model)
            self.check(ref, options)
        return loaded

    def is_silent(self, samples: np.ndarray) -> bool:
        """Digital silence, on which Whisper tends to hallucinate ("you", "Thank you.")."""
        return samples.size == 0 or float(np.abs(samples).max()) < self.silence_peak

    def windows(self, ref: ModelRef, samples: np.ndarray, options: TranscriptionOptions) -> list[Window]:
        """A request's audio as independent ≤30-s windows cut at pauses, with its log-mel computed
        once over the whole audio (as openai-whisper's transcribe() does). CPU work: call off-loop."""
        loaded = self.models.loaded[ref.model]
        mel = whisper.log_mel_spectrogram(torch.from_numpy(samples), loaded.dims.n_mels, padding=whisper.audio.N_SAMPLES)
        language = normalize_language(options.language) if loaded.multilingual else "en"
        prompt = self.prompt_tokens(ref, options) if options.prompt else []
        return [
            Window(
                mel=mel[:, start // HOP_LENGTH : end // HOP_LENGTH].clone(),
                offset=start / SAMPLE_RATE,
                language=language,
                prompt=prompt,
                temperature=options.temperature,
                fallback=options.temperature == 0,
                word_timestamps=options.word_timestamps,
            )
            for start, end in split_at_pauses(samples)
        ]

    def prompt_tokens(self, ref: ModelRef, options: TranscriptionOptions) -> list[int]:
        """The prompt as plain text tokens, its last 223 as openai-whisper keeps (half the text
        context, less <|startofprev|>). Special-token strings such as `<|endoftext|>` are just
        text here: a prompt can never end a window or switch its task."""
        loaded = self.models.loaded[ref.model]
        tokenizer = self.tokenizer(ref, options.task)
        tokens = tokenizer.encoding.encode(" " + options.prompt.strip(), disallowed_special=())
        return tokens[-(loaded.dims.n_text_ctx // 2 - 1) :]

    def tokenizer(self, ref: ModelRef, task: Task) -> Tokenizer:
        loaded = self.models.loaded[ref.model]
        return get_tokenizer(loaded.multilingual, num_languages=loaded.num_languages, task=task)

    def run_batch(
        self,
        ref: ModelRef,
        task: Task,
        windows: list[Window],
        shorten_context: bool,
        abandoned: list[Callable[[], bool]] | None = None,
        encoder_threads: int | None = None,
    ) -> tuple[list[WindowResult], BatchStats]:
        """Decode windows of one model, variant and task in one batch (on the model's worker thread).
        Each result is final, or names the window to decode again (optim/fallback.py). A window
        whose `abandoned()` turns true (nobody waits for it any more) stops decoding at the next
        step and gets an empty result. `encoder_threads`: torch threads for the encoder (decode_batch)."""
        built = self.models.built(ref)  # built on first use
        model, half = built.model, built.half_compute
        tokenizer = self.tokenizer(ref, task)
        abandoned = abandoned or [lambda: False] * len(windows)
        inputs = [
            WindowInput(w.mel, w.language, w.prompt, w.temperature, w.full_context, seed=_seed(w), abandoned=gone)
            for w, gone in zip(windows, abandoned)
        ]
        with torch.inference_mode():
            outputs, stats = decode_batch(
                model, tokenizer, inputs, shorten_context, half=half, fused_attention=ref.variant.fused_attention,
                encoder_threads=encoder_threads,
            )
        results = []
        for window, out, gone, context in zip(windows, outputs, abandoned, stats.encoder_frames):
            again = fallback.retry(window, out, shortened=context < whisper.audio.N_FRAMES)
            if gone():
                results.append(WindowResult(window.offset, [], out.language))
            elif again is not None:
                results.append(WindowResult(window.offset, [], out.language, retry=again))
            elif fallback.is_silence(out):
                results.append(WindowResult(window.offset, [], out.language))
            else:
                segments, rest = self._segments(model, tokenizer, window, out, half)
                results.append(WindowResult(window.offset, segments, out.language, rest=rest))
        # What the batch's tensors freed goes back to the OS now (under 1 ms): glibc would keep it,
        # and RSS crept up round after round (tests/test_memory.py: a tiny.en server held 850-950 MB
        # after each round without this, 440-480 MB with it).
        trim_heap()
        return results, stats

    def _segments(
        self, model: Whisper, tokenizer: Tokenizer, window: Window, out: WindowOutput, half: bool
    ) -> tuple[list[dict], Window | None]:
        """A decoded window's segments (times from the request's start, words when asked) and
        the rest of the window still to decode, if the output stopped early."""
        found, done = split_segments(out.tokens, tokenizer, window.duration)
        segments = [
            dict(
                seek=round(window.offset * 100),
                start=window.offset + start,
                end=window.offset + end,
                text=tokenizer.decode(tokens),
                tokens=tokens,
                temperature=out.temperature,
                avg_logprob=out.avg_logprob,
                compression_ratio=out.compression_ratio,
                no_speech_prob=out.no_speech_prob,
            )
            for start, end, tokens in found
        ]
        segments = [s for s in segments if s["end"] > s["start"] and s["text"].strip()]
        if window.word_timestamps and segments:
            mel = whisper.pad_or_trim(window.mel, whisper.audio.N_FRAMES).to(model.device)
            if half:
                mel = mel.half()
            whisper.timing.add_word_timestamps(
                segments=segments,
                model=model,
                tokenizer=tokenizer,
                mel=mel,
                num_frames=window.mel.shape[-1],
                last_speech_timestamp=window.offset,
            )
        consumed = round(done * 100)  # mel frames
        rest = None
        if 0 < consumed < window.mel.shape[-1]:  # (0: nothing consumed; never re-queue the same window)
            rest = replace(
                window, mel=window.mel[:, consumed:], offset=window.offset + consumed / 100, temperature=0.0 if window.fallback else window.temperature, full_context=False
            )
        return segments, rest


def _seed(window: Window) -> int:
    """A window's sampling seed: from where it starts and how hot it runs, so the same window
    draws the same tokens in any batch and on every run."""
    return zlib.crc32(struct.pack("<dd", window.offset, window.temperature))


def assemble(ref: ModelRef, task: Task, duration: float, results: list[WindowResult]) -> Transcript:
    """A request's transcript from its windows' final results, in order."""
    raw = [s for r in results for s in r.segments]
    segments = [_segment({**s, "id": i}, duration) for i, s in enumerate(raw)]
    spoken: dict[str, float] = {}  # language → seconds of speech it was detected on
    for r in results:
        spoken[r.language] = spoken.get(r.language, 0.0) + sum(s["end"] - s["start"] for s in r.segments)
    language = max(spoken, key=spoken.get) if spoken else "en"
    return Transcript(
        text="".join(s.text for s in segments).strip(),
        language=language,
        duration=duration,
        segments=segments,
        model=ref.model,
        variant=str(ref.variant),
        task=task,
    )


def _clamp(t: float, duration: float) -> float:
    # Whisper pads the last window to 30 s, so a final timestamp can point past the audio;
    # round down at the end so that a rounded timestamp never exceeds the duration either.
    return min(round(max(float(t), 0.0), 3), math.floor(duration * 1000) / 1000)


def _segment(s: dict, duration: float) -> Segment:
    start, end = _clamp(s["start"], duration), _clamp(s["end"], duration)
    return Segment(
        id=s["id"],
        seek=s["seek"],
        start=start,
        end=max(start, end),
        text=s["text"],
        tokens=list(s["tokens"]),
        temperature=float(s["temperature"]),
        avg_logprob=float(s["avg_logprob"]),
        compression_ratio=float(s["compression_ratio"]),
        no_speech_prob=float(s["no_speech_prob"]),
        words=[
            Word(w["word"], _clamp(w["start"], duration), max(_clamp(w["start"], duration), _clamp(w["end"], duration)), float(w["probability"]))
            for w in s.get("words", [])
        ],
    )
