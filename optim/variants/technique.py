"""What a technique declares about itself, so that the registry can derive everything else:
which combinations exist on a device, the order transforms run in, and how the batched decoder
computes attention and in which precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from whisper.model import Whisper


@dataclass(frozen=True)
class Technique:
    name: str  # as spelled in a variant name
    # `Whisper -> Whisper`, in place on the variant's own copy; None for a technique that picks
    # the model to transform instead (`distilled`: the student in place of the teacher).
    apply: Optional[Callable[[Whisper], Whisper]]
    # Transforms run by stage (0 picks the source, 1 rewrites modules that need float32 weights,
    # 2 changes precision), and by registry order within a stage.
    stage: int
    group: Optional[str] = None  # at most one technique of a group in a variant ("precision")
    devices: tuple[str, ...] = ("cpu", "cuda")  # where its kernels run
    fused_attention: bool = False  # the batched decoder uses SDPA instead of the explicit softmax
    half_precision: bool = False  # weights in float16; computed in float16 where the device can (CUDA)
    converts_weights: bool = False  # builds new copies of every weight (nothing shared with the source)
    # Holds its own copy of the large weights (int8, fp16): built straight from the weights as
    # stored (float16 for the bundled models), it never needs a float32 copy of the model.
    own_weights: bool = False
