"""`python -m optim.distill`: build a distilled student of a served Whisper model, on this CPU.

* **Student**: the teacher's encoder, frozen, and `--layers` decoder layers copied from maximally
  spaced teacher layers (optim/student.py; Distil-Whisper's recipe).
* **Data**: unlabeled audio from manifests or folders (default ../shared/eval/en_untranscribed,
  65 minutes of LibriSpeech), cut into ≤30-s windows at pauses as the service cuts requests.
* **Pseudo-labels**: the teacher's greedy transcripts with timestamps at the full 30-s context (the
  token sequences the service decodes), cached. Windows the service would re-decode (low
  confidence, repetitive) are dropped instead: a label the teacher is unsure of teaches noise.
* **Frozen encoder → cached encoder outputs**, computed once at the audio context the service
  runs each window with (dynamic context, optim/decoding.py), so training runs decoders only.
* **Loss**: KL divergence to the teacher's token distribution (teacher-forced on the label, at
  temperature T, scaled by T²) plus cross-entropy on the label.
* A tenth of the clips is held out for the validation loss that picks the checkpoint kept; the
  final evaluation transcribes `en_read` (never trained on) through the service's engine.

Resumable (a checkpoint per epoch in the cache folder), deterministic for a seed. Writes the
student to MODELS_DIR/distilled/<teacher>.pt, where the service serves it as `<teacher>:distilled`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from torch import Tensor
from tqdm import tqdm
from whisper.audio import HOP_LENGTH, N_SAMPLES
from whisper.model import Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer

from optim.audio import decode_audio
from optim.decoding import WindowInput, audio_context, decode_batch, encode
from optim.engine import WhisperEngine
from optim.evaluation import EVAL_DIR, audio_seconds, load_set, measure
from optim.fallback import is_trusted
from optim.registry import build_variant, parse_variant
from optim.scheduler import SchedulerConfig
from optim.student import make_student, save_student, spaced_layers, student_path
from optim.weights import load_whisper
from optim.windows import split_at_pauses

DEFAULT_DATA = EVAL_DIR / "en_untranscribed"
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm"}


@dataclass(frozen=True)
class Config:
    teacher: str
    layers: int = 2
    epochs: int = 12
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the steps
    kl_weight: float = 0.8
    ce_weight: float = 1.0
    temperature: float = 2.0
    seed: int = 0
    held_out: float = 0.1  # share of the clips

    def run_key(self, data_key: str) -> str:
        return hashlib.sha256(json.dumps([asdict(self), data_key]).encode()).hexdigest()[:12]


@dataclass
class Example:
    clip: str
    seconds: float
    tokens: list[int]  # sot sequence, the teacher's text and timestamp tokens, end of text
    audio: Tensor  # the frozen encoder's output at the window's serving context, float16


# ------------------------------------------------------------------------------ data
def read_clips(sources: list[Path]) -> list[tuple[str, Path]]:
    """(clip id, audio file) from folders with a manifest.jsonl (its `audio` and `id` fields),
    manifest files, or folders of audio files."""
    clips = []
    for source in sources:
        manifest = source if source.is_file() else source / "manifest.jsonl"
        if manifest.is_file():
            for line in manifest.read_text().splitlines():
                item = json.loads(line)
                clips.append((item.get("id") or Path(item["audio"]).stem, manifest.parent / item["audio"]))
        elif source.is_dir():
            clips += [(f.stem, f) for f in sorted(source.rglob("*")) if f.suffix.lower() in AUDIO_SUFFIXES]
        else:
            raise FileNotFoundError(f"no audio at {source}: expected a manifest.jsonl, a folder with one, or audio files")
    if not clips:
        raise ValueError(f"no audio found in {', '.join(map(str, sources))}")
    return clips


def data_key(clips: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for clip_id, path in clips:
        digest.update(f"{clip_id}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()[:12]


def held_out(clip_id: str, share: float) -> bool:
    """A fixed share of the clips, chosen by a hash of the id: the same split on every run."""
    return int(hashlib.sha256(clip_id.encode()).hexdigest(), 16) % 1000 < share * 1000


def windows(clips: list[tuple[str, Path]], n_mels: int) -> list[tuple[str, Tensor]]:
    """(clip id, log-mel) per ≤30-s window, cut and computed as the service does."""
    out = []
    for clip_id, path in tqdm(clips, desc="reading audio", unit="clip"):
        samples = decode_audio(path.read_bytes()).samples
        mel = whisper.log_mel_spectrogram(torch.from_numpy(samples), n_mels, padding=N_SAMPLES)
        out += [(clip_id, mel[:, start // HOP_LENGTH : end // HOP_LENGTH].clone()) for start, end in split_at_pauses(samples)]
    return out


def label(teacher: Whisper, tokenizer: Tokenizer, mels: list[Tensor], batch_size: int) -> list[list[int] | None]:
    """The teacher's greedy tokens per window at the full context; None where the service would
    not trust them (the engine's fallback thresholds)."""
    flash = parse_variant("flash")
    fast = build_variant(teacher, flash)  # exact (tested against fp32), faster
    labels: list[list[int] | None] = [None] * len(mels)
    order = sorted(range(len(mels)), key=lambda i: mels[i].shape[-1])  # similar lengths together
    with torch.inference_mode(), tqdm(total=len(mels), desc="pseudo-labels", unit="window") as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            inputs = [WindowInput(mels[i], "en", [], 0.0, full_context=True) for i in chunk]
            outputs, _ = decode_batch(fast, tokenizer, inputs, shorten_context=False, fused_attention=flash.fused_attention)
            for i, o in zip(chunk, outputs):
                # a label the service would re-decode hotter (optim/fallback.py) is dropped instead
                labels[i] = [*tokenizer.sot_sequence, *o.tokens, tokenizer.eot] if is_trusted(o) else None
            bar.update(len(chunk))
    return labels


def encode_windows(teacher: Whisper, mels: list[Tensor]) -> list[Tensor]:
    """The frozen encoder's output per window, at the context the service would run it with."""
    out = []
    with torch.inference_mode():
        for mel in tqdm(mels, desc="encoder outputs", unit="window"):
            context = audio_context(mel.shape[-1], shorten=True)
            padded = torch.zeros(mel.shape[0], context)
            padded[:, : mel.shape[-1]] = mel[:, :context]
            out.append(encode(teacher, padded[None])[0].to(torch.float16))
    return out


def prepare(teacher: Whisper, tokenizer: Tokenizer, clips: list[tuple[str, Path]], cache: Path, batch_size: int) -> tuple[list[Example], dict]:
    """Examples (cached in `cache`), and what was kept and dropped."""
    path = cache / "examples.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        return [Example(**e) for e in saved["examples"]], saved["data"]
    started = time.perf_counter()
    cut = windows(clips, teacher.dims.n_mels)
    labels = label(teacher, tokenizer, [m for _, m in cut], batch_size)
    labelled = time.perf_counter()
    kept = [(clip, mel, tokens) for (clip, mel), tokens in zip(cut, labels) if tokens is not None]
    encoded = encode_windows(teacher, [mel for _, mel, _ in kept])
    examples = [Example(clip, mel.shape[-1] / 100, tokens, audio) for (clip, mel, tokens), audio in zip(kept, encoded)]
    data = {
        "clips": len(clips),
        "windows": len(cut),
        "windows_kept": len(kept),
        "audio_seconds": round(sum(m.shape[-1] for _, m in cut) / 100, 1),
        "audio_seconds_kept": round(sum(e.seconds for e in examples), 1),
        "label_seconds": round(labelled - started, 1),
        "encode_seconds": round(time.perf_counter() - labelled, 1),
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"examples": [asdict(e) for e in examples], "data": data}, path)
    return examples, data


# ------------------------------------------------------------------------------ training
def batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Batches of windows with the same encoder context (no padding of the encoder outputs), shuffled."""
    groups: dict[int, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.audio.shape[0], []).append(e)
    out = []
    for group in groups.values():
        rng.shuffle(group)
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(out)
    return out


def collate(batch: list[Example], pad: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(encoder outputs, decoder input tokens, target tokens, mask of real targets)."""
    length = max(len(e.tokens) for e in batch) - 1
    inputs = torch.full((len(batch), length), pad, dtype=torch.long)
    targets = torch.full((len(batch), length), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.bool)
    for i, e in enumerate(batch):
        tokens = torch.tensor(e.tokens)
        inputs[i, : len(tokens) - 1] = tokens[:-1]
        targets[i, : len(tokens) - 1] = tokens[1:]
        mask[i, : len(tokens) - 1] = True
    audio = torch.stack([e.audio for e in batch]).float()
    return audio, inputs, targets, mask


def losses(student: Whisper, teacher: Whisper, batch: list[Example], config: Config, pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """(total, cross-entropy, KL) averaged over the batch's label tokens."""
    audio, inputs, targets, mask = collate(batch, pad)
    with torch.no_grad():
        teacher_logits = teacher.decoder(inputs, audio)[mask]
    student_logits = student.decoder(inputs, audio)[mask]
    ce = F.cross_entropy(student_logits, targets[mask])
    t = config.temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1), log_target=True, reduction="batchmean"
    ) * t**2
    return config.ce_weight * ce + config.kl_weight * kl, ce, kl


def trainable(student: Whisper) -> list[torch.nn.Parameter]:
    """The decoder's layers and final norm. The token embedding (also the output projection) and
    the positional embedding stay the teacher's: 65 minutes of audio is too little to move them."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for p in (*student.decoder.blocks.parameters(), *student.decoder.ln.parameters())]
    for p in params:
        p.requires_grad_(True)
    return params


def evaluate_loss(student: Whisper, teacher: Whisper, examples: list[Example], config: Config, pad: int) -> float:
    student.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(examples, config.batch_size, random.Random(0)):
            loss, _, _ = losses(student, teacher, batch, config, pad)
            total, count = total + loss.item() * len(batch), count + len(batch)
    return total / max(count, 1)


def train(teacher: Whisper, examples: list[Example], validation: list[Example], config: Config, cache: Path, pad: int) -> tuple[Whisper, dict]:
    """Train (or resume) a student; returns the one with the best validation loss, and the history."""
    torch.manual_seed(config.seed)
    student = make_student(teacher, config.layers)
    params = trainable(student)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(batches(examples, config.batch_size, random.Random(0)))
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup * total_steps))

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to a tenth
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    cache.mkdir(parents=True, exist_ok=True)
    checkpoint_path = cache / "checkpoint.pt"
    history: list[dict] = []
    if not validation:
        raise ValueError("no clip is held out for validation: raise --held-out or give more clips")
    # Only the decoder changes: checkpoints keep the decoder alone (the encoder is the teacher's).
    untrained = evaluate_loss(student, teacher, validation, config, pad)  # the copied layers, before any step
    best = {"val_loss": untrained, "epoch": 0, "decoder": {k: v.clone() for k, v in student.decoder.state_dict().items()}}
    start_epoch = 0
    if checkpoint_path.is_file():  # resume
        saved = torch.load(checkpoint_path, weights_only=False)
        student.decoder.load_state_dict(saved["decoder"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history, best, start_epoch, untrained = saved["history"], saved["best"], saved["epoch"], saved["untrained_val_loss"]
        torch.set_rng_state(saved["torch_rng"])
        print(f"resuming after epoch {start_epoch} (best validation loss {best['val_loss']:.4f} at epoch {best['epoch']})")
    history_start = time.perf_counter() - sum(h["seconds"] for h in history)
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        student.train()
        rng = random.Random(config.seed * 1000 + epoch)  # the epoch's order, the same on a resumed run
        plan = batches(examples, config.batch_size, rng)
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
        bar = tqdm(plan, desc=f"epoch {epoch}/{config.epochs}", unit="batch")
        for i, batch in enumerate(bar, start=1):
            loss, ce, kl = losses(student, teacher, batch, config, pad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            for key, value in (("loss", loss), ("ce", ce), ("kl", kl)):
                sums[key] += value.item()
            bar.set_postfix(loss=f"{sums['loss'] / i:.3f}", ce=f"{sums['ce'] / i:.3f}", kl=f"{sums['kl'] / i:.3f}")
        val_loss = evaluate_loss(student, teacher, validation, config, pad)
        history.append({
            "epoch": epoch, **{k: round(v / len(plan), 4) for k, v in sums.items()}, "val_loss": round(val_loss, 4),
            "seconds": round(time.perf_counter() - started, 1),
        })
        print(f"epoch {epoch}: train loss {history[-1]['loss']:.4f}, validation loss {val_loss:.4f}")
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "epoch": epoch, "decoder": {k: v.clone() for k, v in student.decoder.state_dict().items()}}
        torch.save({"decoder": student.decoder.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "history": history, "best": best, "epoch": epoch, "torch_rng": torch.get_rng_state(),
                    "untrained_val_loss": untrained}, checkpoint_path)
    student.decoder.load_state_dict(best["decoder"])
    summary = {"history": history, "best_epoch": best["epoch"], "best_val_loss": round(best["val_loss"], 4),
               "untrained_val_loss": round(untrained, 4),
               "train_seconds": round(time.perf_counter() - history_start, 1)}
    return student.eval(), summary


# ------------------------------------------------------------------------------ evaluation
def evaluate_wer(teacher_id: str, models_dir: Path, eval_dir: Path, variant: str = "flash") -> dict:
    """Teacher and student on `eval_dir`'s en_read through the service's engine and scheduler
    (batched, dynamic audio context: the service's defaults)."""
    clips = load_set("en_read", eval_dir)
    engine = WhisperEngine({teacher_id: teacher_id}, models_dir=models_dir)
    config = SchedulerConfig(max_batch_size=8, shorten_context=True)
    try:
        results = {name: measure(engine, engine.models.ref(teacher_id, engine.models.variant(name)), config, clips) for name in (variant, f"distilled+{variant}")}
    finally:
        engine.close()
    return {"set": "en_read", "clips": len(clips), "audio_seconds": round(audio_seconds(clips), 1), **results}


# ------------------------------------------------------------------------------ command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optim.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a served model: tiny.en, base, or a path")
    parser.add_argument("--data", type=Path, action="append", help=f"unlabeled audio: a manifest.jsonl, a folder with one, "
                        f"or a folder of audio files (repeatable; default {DEFAULT_DATA})")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="where the student goes (MODELS_DIR)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/distill"), help="pseudo-labels, encoder outputs, checkpoints")
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR, help="held-out evaluation sets (en_read)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final WER evaluation")
    for field_name, default in asdict(Config(teacher="")).items():
        if field_name != "teacher":
            parser.add_argument(f"--{field_name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    config = Config(**{k: getattr(args, k) for k in asdict(Config(teacher="")) if k != "teacher"}, teacher=args.teacher)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    clips = read_clips(args.data or [DEFAULT_DATA])
    teacher = load_whisper(config.teacher).eval()
    teacher_id = Path(config.teacher).stem if Path(config.teacher).exists() else config.teacher
    tokenizer = get_tokenizer(teacher.is_multilingual, num_languages=teacher.num_languages, language="en", task="transcribe")
    key = data_key(clips)
    data_cache = args.cache / teacher_id / key
    run_cache = data_cache / config.run_key(key)
    started = time.perf_counter()
    examples, data = prepare(teacher, tokenizer, clips, data_cache, config.batch_size)
    train_set = [e for e in examples if not held_out(e.clip, config.held_out)]
    validation = [e for e in examples if held_out(e.clip, config.held_out)]
    print(f"{data['windows_kept']} of {data['windows']} windows labelled ({data['audio_seconds_kept']} of "
          f"{data['audio_seconds']} s); {len(train_set)} for training, {len(validation)} for validation")
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, summary = train(teacher, train_set, validation, config, run_cache, tokenizer.eot)

    record = {
        "teacher": teacher_id,
        "layers": spaced_layers(teacher.dims.n_text_layer, config.layers),
        "teacher_layers": teacher.dims.n_text_layer,
        "config": asdict(config),
        "data": {**data, "sources": [str(s) for s in (args.data or [DEFAULT_DATA])],
                 "train_windows": len(train_set), "validation_windows": len(validation)},
        "training": summary,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    out = student_path(args.models_dir, teacher_id)
    save_student(student, out, record)
    print(f"wrote {out}")
    if not args.no_eval:
        record["evaluation"] = evaluate_wer(teacher_id, args.models_dir, args.eval_dir)
        save_student(student, out, record)
        print(json.dumps(record["evaluation"]))
    (out.with_suffix(".json")).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
