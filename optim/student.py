"""A distilled student of a Whisper teacher: the teacher's whole encoder, and a shallow decoder
whose few layers are copies of maximally spaced teacher layers (Distil-Whisper, Gandhi et al.
2023: first and last for two). The decoder runs once per token, the encoder once per window, so
moving depth out of the decoder is where Whisper's latency goes down.

Students are saved as openai-whisper checkpoints with a `distillation` record (teacher, copied
layers, training data and figures), under MODELS_DIR/distilled/<teacher>.pt, which is where the
service looks for `<teacher>:distilled`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from whisper.model import ModelDimensions, TextDecoder, Whisper

from optim.weights import load_openai_checkpoint, save_openai_checkpoint

STUDENTS_DIR = "distilled"  # under MODELS_DIR


def spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Indices of `student_layers` teacher layers spread as far apart as possible, first and last
    included: 2 of 4 → [0, 3]; 3 of 6 → [0, 2, 5]; 1 → [0]."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student needs 1 to {teacher_layers} decoder layers, not {student_layers}")
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


def make_student(teacher: Whisper, layers: int = 2) -> Whisper:
    """The teacher's encoder and embeddings, and `layers` of its decoder blocks (copies)."""
    chosen = spaced_layers(teacher.dims.n_text_layer, layers)
    dims = ModelDimensions(**{**vars(teacher.dims), "n_text_layer": layers})
    student = Whisper(dims)
    student.encoder = copy.deepcopy(teacher.encoder)
    decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, layers)
    decoder.token_embedding.load_state_dict(teacher.decoder.token_embedding.state_dict())
    decoder.positional_embedding.data.copy_(teacher.decoder.positional_embedding.data)
    decoder.ln.load_state_dict(teacher.decoder.ln.state_dict())
    for block, index in zip(decoder.blocks, chosen):
        block.load_state_dict(teacher.decoder.blocks[index].state_dict())
    student.decoder = decoder
    # Word timing reads cross-attention heads: keep the teacher's alignment heads of the copied
    # layers; where none was copied, every head of the last layer (its deepest, most aligned one).
    teacher_heads = teacher.alignment_heads.to_dense()
    heads = torch.zeros(layers, dims.n_text_head, dtype=torch.bool)
    for new, old in enumerate(chosen):
        heads[new] = teacher_heads[old]
    if not heads.any():
        heads[-1] = True
    student.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    return student.to(next(teacher.parameters()).device).eval()


def share_with_teacher(student: Whisper, teacher: Whisper) -> int:
    """Point every student weight equal to the teacher's same-named one at the teacher's tensor
    (the frozen encoder and embeddings: most of a student), so serving both costs the student's
    trained layers only. Returns the bytes shared."""
    teacher_params = dict(teacher.named_parameters())
    shared = 0
    for name, param in list(student.named_parameters()):
        theirs = teacher_params.get(name)
        if theirs is not None and theirs.shape == param.shape and theirs.dtype == param.dtype and torch.equal(theirs, param):
            module_name, _, attribute = name.rpartition(".")
            setattr(student.get_submodule(module_name), attribute, theirs)
            shared += param.numel() * param.element_size()
    return shared


def student_path(models_dir: Path, teacher_id: str) -> Path:
    return models_dir / STUDENTS_DIR / f"{teacher_id}.pt"


def save_student(student: Whisper, path: Path, record: dict) -> None:
    """An openai-whisper checkpoint (loadable by openai-whisper itself) plus the distillation record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_openai_checkpoint(student, path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["distillation"] = record
    heads = student.alignment_heads.to_dense().nonzero().tolist()
    checkpoint["alignment_heads"] = heads
    torch.save(checkpoint, path)


def load_student(path: Path) -> tuple[Whisper, dict]:
    """The student and its distillation record."""
    model = load_openai_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    heads = checkpoint.get("alignment_heads")
    if heads:
        mask = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
        for layer, head in heads:
            mask[layer, head] = True
        model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model, checkpoint.get("distillation", {})
