"""The library's value types: what a request asks for (`ModelRef`, `TranscriptionOptions`), the
pieces it is cut into (`Window`, `WindowResult`), and what comes back (`Transcript`, `Timing`,
`Outcome`). Plain frozen dataclasses, no behaviour beyond derived fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from optim.accuracy import Score
from optim.variants.technique import Technique

Task = Literal["transcribe", "translate"]
REFERENCE = "fp32"  # the variant with no technique: openai-whisper's float32 model, eager attention


@dataclass(frozen=True)
class Variant:
    """A canonical combination of techniques (build one with `optim.registry.parse_variant`)."""

    techniques: tuple[Technique, ...] = ()  # in the registry's order, which is how names are spelled

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.techniques) or REFERENCE

    def __str__(self) -> str:
        return self.name

    @property
    def distilled(self) -> bool:
        """Runs a distilled student in place of the model (a technique without a transform)."""
        return any(t.apply is None for t in self.techniques)

    @property
    def transforms(self) -> tuple[Technique, ...]:
        """The techniques that transform the model, in the order they run (stage, then registry order)."""
        return tuple(sorted((t for t in self.techniques if t.apply is not None), key=lambda t: t.stage))

    @property
    def fused_attention(self) -> bool:
        return any(t.fused_attention for t in self.techniques)

    @property
    def half_precision(self) -> bool:
        return any(t.half_precision for t in self.techniques)

    @property
    def converts_weights(self) -> bool:
        return any(t.converts_weights for t in self.techniques)

    @property
    def own_weights(self) -> bool:
        return any(t.own_weights for t in self.techniques)

    def runs_on(self, device: str) -> bool:
        return all(device in t.devices for t in self.techniques)


@dataclass(frozen=True)
class ModelRef:
    """One served model and variant: what a request resolves to, once, at the edge."""

    model: str
    variant: Variant

    def __str__(self) -> str:
        return f"{self.model}:{self.variant}"


@dataclass(frozen=True)
class TranscriptionOptions:
    task: Task = "transcribe"
    language: str | None = None  # ISO code or English name; None = detect
    prompt: str | None = None
    temperature: float = 0.0  # 0 = greedy with openai-whisper's temperature fallback
    word_timestamps: bool = False


@dataclass(frozen=True, eq=False)  # holds a tensor: identity, not value
class Window:
    """One ≤30-s piece of a request's audio, decoded independently of the others."""

    mel: Tensor  # (n_mels, frames), no padding
    offset: float  # seconds from the start of the request's audio
    language: str | None  # None: detect
    prompt: list[int]
    temperature: float
    fallback: bool  # re-decode hotter when the output looks wrong (temperature was not fixed)
    word_timestamps: bool
    full_context: bool = False

    @property
    def duration(self) -> float:
        return self.mel.shape[-1] / 100

    @property
    def padded_seconds(self) -> float:
        """The audio it costs in a batch: 30 s when it needs the full encoder context."""
        return 30.0 if self.full_context else self.duration


@dataclass(frozen=True)
class WindowResult:
    offset: float  # the window's start, seconds from the request's start
    segments: list[dict]  # openai-whisper's segment dicts, times from the request's start
    language: str
    retry: Window | None = None  # decode this instead: the result is not final
    rest: Window | None = None  # the output stopped early: decode the rest of the window too


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] = field(default_factory=list)


@dataclass(frozen=True)
class Transcript:
    """What was heard: the same whatever scheduled it."""

    text: str
    language: str  # ISO code
    duration: float  # audio seconds
    segments: list[Segment]
    model: str
    variant: str  # canonical name
    task: Task

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]


@dataclass(frozen=True)
class Timing:
    """How the scheduler ran a request's windows (all zero for audio answered without the model)."""

    queue_seconds: float = 0.0  # from arrival to the first batch that held one of its windows
    compute_seconds: float = 0.0  # from then to the last window's result
    batch_size: float = 1.0  # mean size of the batches its windows ran in
    encoder_padding: float = 0.0  # mean padding ratio of those batches
    decoder_padding: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """A finished request: its transcript and how it went."""

    transcript: Transcript
    timing: Timing
    decode_seconds: float  # upload → 16 kHz samples
    total_seconds: float  # from the parsed request to the scored transcript
    score: Score | None = None  # against the request's reference, if it had one

    @property
    def rtfx(self) -> float | None:
        """Audio seconds per compute second; None for audio answered without the model (silence)."""
        seconds = self.timing.compute_seconds
        return self.transcript.duration / seconds if seconds > 0 else None
