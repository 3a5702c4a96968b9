"""The replayed workload: a fixed, seeded draw of real speech clips, read into memory once.

Every configuration under test gets the very same list (same clips, same order), so that
throughput, latency and transcripts can be compared item by item. A quarter of the draw are
clips with a reference transcript (`en_read`), so that WER can be reported; LibriSpeech clips
without references (`en_untranscribed`, 2–35 s) make up the rest and bring the mix of durations.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

DEFAULT_EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
REFERENCED_SET = "en_read"
UNREFERENCED_SET = "en_untranscribed"


@dataclass(frozen=True)
class WorkItem:
    """One request of the workload: the clip's bytes travel as uploaded, under their own filename."""

    id: str
    path: Path
    duration: float
    reference: str | None
    audio: bytes

    @property
    def filename(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Workload:
    items: list[WorkItem]
    seed: int
    max_duration: float | None

    def describe(self) -> dict:
        durations = [item.duration for item in self.items]
        return {
            "count": len(self.items),
            "with_reference": sum(item.reference is not None for item in self.items),
            "total_audio_s": round(sum(durations), 3),
            "duration_min_s": min(durations),
            "duration_median_s": statistics.median(durations),
            "duration_max_s": max(durations),
            "seed": self.seed,
            "max_duration_s": self.max_duration,
            "items": [
                {"id": item.id, "duration_s": item.duration, "has_reference": item.reference is not None} for item in self.items
            ],
        }


@dataclass(frozen=True)
class ManifestEntry:
    id: str
    path: Path
    duration: float
    reference: str | None
    lang: str | None = None


def read_manifest(folder: Path) -> list[ManifestEntry]:
    """The entries of `folder/manifest.jsonl`, audio paths resolved against that folder."""
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"no manifest at {manifest} (set --eval-dir to the folder holding {REFERENCED_SET}/ and {UNREFERENCED_SET}/)"
        )
    entries = []
    for line in manifest.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            # Audio paths in a manifest are relative to the manifest's own folder.
            entries.append(
                ManifestEntry(row["id"], folder / row["audio"], float(row["duration_s"]), row.get("text"), row.get("lang"))
            )
    return entries


def build_workload(count: int, seed: int = 0, eval_dir: Path = DEFAULT_EVAL_DIR, max_duration: float | None = None) -> Workload:
    """Draw `count` clips: every referenced clip that fits, then unreferenced ones, shuffled, all with one seeded RNG."""
    if count < 1:
        raise ValueError("the workload needs at least one request")
    fits = (lambda e: e.duration <= max_duration) if max_duration is not None else (lambda e: True)
    referenced = sorted((e for e in read_manifest(eval_dir / REFERENCED_SET) if fits(e)), key=lambda e: e.id)
    unreferenced = sorted((e for e in read_manifest(eval_dir / UNREFERENCED_SET) if fits(e)), key=lambda e: e.id)
    if count > len(referenced) + len(unreferenced):
        raise ValueError(f"asked for {count} requests, but only {len(referenced) + len(unreferenced)} clips fit")

    # Sorting by id above makes the draw independent of manifest line order; only the seed matters.
    rng = random.Random(seed)
    chosen = rng.sample(referenced, min(max(1, count // 4), len(referenced)))  # a quarter: WER; the rest: mixed durations
    chosen += rng.sample(unreferenced, count - len(chosen))
    rng.shuffle(chosen)

    ids = [entry.id for entry in chosen]
    if len(set(ids)) != len(ids):
        raise ValueError("clip ids are not unique across the manifests")
    items = [WorkItem(e.id, e.path, e.duration, e.reference, e.path.read_bytes()) for e in chosen]
    return Workload(items, seed, max_duration)
