"""What the benchmark commands share: where the repository is, and the machine a result was
measured on (the load test's description plus what a model benchmark needs to be re-run)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import whisper
from whisper.model import Whisper

from loadtest.report import machine_info as host_info
from optim.decoding import KVCache, decoder_hidden, encode, logits
from optim.types import Variant

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks"


def machine_info() -> dict:
    """The host (CPU, cores, platform, Python) plus ISA flags, torch's threads, CUDA and the
    versions of every engine measured, and the date."""
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), [])
    versions = {"python": host_info()["python"], "torch": torch.__version__, "openai-whisper": whisper.__version__}
    for package in ("faster_whisper", "ctranslate2"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return {
        **host_info(),
        "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags],
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
    }


def decoder_seconds_per_token(model: Whisper, variant: Variant, steps: int = 100) -> float:
    """Greedy steps of the decoder alone (the encoder output is computed before the clock starts)."""
    with torch.inference_mode():
        audio = encode(model, torch.zeros(1, model.dims.n_mels, 3000))
        token = torch.tensor([[50257]])
        for timed in (False, True):  # a warm-up pass, then the measured one
            cache = KVCache(model, 1, steps + 1, audio, variant.fused_attention)
            start = time.perf_counter()
            x = token
            for _ in range(steps):
                hidden = decoder_hidden(model, x, cache, torch.ones(1, dtype=torch.long))
                x = logits(model, hidden[:, -1:]).argmax(-1)
            if timed:
                return (time.perf_counter() - start) / steps
    raise AssertionError("unreachable")


def write_results(out: Path, name: str, result: dict, markdown: str) -> None:
    """A benchmark's results as `out/<name>.json` and `out/<name>.md`, the Markdown also printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)

