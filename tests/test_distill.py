"""Distilled students: the architecture and layer copy, a short real distillation run on real speech
(the loss falls, checkpoints resume, runs repeat exactly), the saved student round trip, and the
student served through the API as `tiny.en:distilled`."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from optim.distill import held_out, main
from optim.student import load_student, make_student, spaced_layers, student_path
from tests.conftest import DATA, Server, english_wer, normalize

# Training audio: LJ Speech (the 237-s recording cut into 8 windows and 5 short clips). Held out
# for the validation loss by the command's hash split at 15 %: the Common Voice clip and the 52-s
# recording. jfk is in neither: the served student is tried on it.
TRAIN_CLIPS = ["lj-LJ001-0001-0032-concat", "lj-LJ001-0001", "lj-LJ001-0002", "lj-LJ001-0003", "lj-LJ001-0004", "lj-LJ001-0005"]
VALIDATION_CLIPS = ["cv-en-22058264", "mfa-michaelandsickmichael"]
HELD_OUT = 0.15


def test_spaced_layers():
    assert spaced_layers(4, 2) == [0, 3]  # tiny: first and last
    assert spaced_layers(6, 2) == [0, 5]  # base
    assert spaced_layers(6, 3) == [0, 2, 5]  # rounded to the nearest layer, half up
    assert spaced_layers(32, 2) == [0, 31]  # large: Distil-Whisper's choice
    assert spaced_layers(4, 1) == [0]
    with pytest.raises(ValueError):
        spaced_layers(4, 5)


def test_student_copies_the_encoder_and_spaced_decoder_layers(tiny_model):
    student = make_student(tiny_model, 2)
    assert student.dims.n_text_layer == 2 and student.dims.n_audio_layer == tiny_model.dims.n_audio_layer
    assert len(student.decoder.blocks) == 2
    teacher_state, student_state = tiny_model.state_dict(), student.state_dict()
    for name, tensor in student_state.items():
        if name.startswith("decoder.blocks."):
            index, rest = name.removeprefix("decoder.blocks.").split(".", 1)
            source = f"decoder.blocks.{[0, 3][int(index)]}.{rest}"
        else:
            source = name
        assert torch.equal(tensor, teacher_state[source]), name
    # not shared: training the student leaves the teacher alone
    assert student.decoder.blocks[0].mlp[0].weight.data_ptr() != tiny_model.decoder.blocks[0].mlp[0].weight.data_ptr()
    # the teacher's alignment heads of the copied layers 0 and 3 (tiny.en's lie in layers 2 and 3)
    assert torch.equal(student.alignment_heads.to_dense()[1], tiny_model.alignment_heads.to_dense()[3])
    # fewer parameters in the decoder: 2 of 4 blocks
    params = lambda m: sum(p.numel() for p in m.decoder.blocks.parameters())  # noqa: E731
    assert params(student) * 2 == params(tiny_model)


def test_serving_shares_the_frozen_weights_with_the_teacher(tiny_model):
    from optim.student import share_with_teacher

    student = make_student(tiny_model, 2)
    with torch.no_grad():
        student.decoder.blocks[0].mlp[0].weight.add_(0.01)  # as training changes the decoder layers
    before = [p.clone() for p in student.parameters()]
    shared = share_with_teacher(student, tiny_model)
    assert student.encoder.conv1.weight is tiny_model.encoder.conv1.weight
    assert student.decoder.token_embedding.weight is tiny_model.decoder.token_embedding.weight
    assert student.decoder.blocks[0].mlp[0].weight is not tiny_model.decoder.blocks[0].mlp[0].weight
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))  # the same values
    encoder_bytes = sum(p.numel() * 4 for p in tiny_model.encoder.parameters())
    assert encoder_bytes < shared < encoder_bytes + sum(p.numel() * 4 for p in tiny_model.decoder.parameters())


def test_the_split_holds_out_the_validation_clips():
    assert [c for c in TRAIN_CLIPS + VALIDATION_CLIPS if held_out(c, HELD_OUT)] == VALIDATION_CLIPS


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, clips):
    """`python -m optim.distill` on tiny.en with 8 real clips, 3 epochs (about a minute here)."""
    root = tmp_path_factory.mktemp("distill")
    manifest = root / "manifest.jsonl"
    lines = [json.dumps({"id": c, "audio": str(clips[c].path)}) for c in TRAIN_CLIPS + VALIDATION_CLIPS]
    manifest.write_text("\n".join(lines) + "\n")
    args = ["--teacher", "tiny.en", "--data", str(manifest), "--models-dir", str(root / "models"), "--cache", str(root / "cache"),
            "--epochs", "3", "--batch-size", "4", "--held-out", str(HELD_OUT), "--no-eval"]
    assert main(args) == 0
    return root, args


def test_distillation_lowers_the_loss(distilled):
    root, _ = distilled
    student, record = load_student(student_path(root / "models", "tiny.en"))
    training = record["training"]
    history = training["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]  # on the training windows
    assert training["best_val_loss"] < training["untrained_val_loss"]  # on held-out clips, against the copied layers
    assert record["teacher"] == "tiny.en" and record["layers"] == [0, 3] and record["teacher_layers"] == 4
    data = record["data"]
    assert data["clips"] == 8 and data["validation_windows"] == 3  # cv: one window, the 52-s file: two
    assert data["windows"] == 19  # the 237-s recording cut at pauses into 11 windows, and 8 short clips
    assert data["train_windows"] + data["validation_windows"] == data["windows_kept"] <= 19
    assert student.dims.n_text_layer == 2


def test_checkpoints_resume_and_runs_repeat(distilled, capsys):
    root, args = distilled
    path = student_path(root / "models", "tiny.en")
    first, _ = load_student(path)
    assert main(args) == 0  # the same run again: resumes after its last epoch, trains nothing more
    assert "resuming after epoch 3" in capsys.readouterr().out
    resumed, _ = load_student(path)
    # a fresh run (pseudo-labels and encoder outputs still cached) gives the same weights: seeded
    for run in (root / "cache" / "tiny.en").glob("*/*/"):
        shutil.rmtree(run)
    assert main(args) == 0
    again, _ = load_student(path)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_the_saved_student_is_an_openai_whisper_checkpoint(distilled):
    import whisper

    root, _ = distilled
    path = student_path(root / "models", "tiny.en")
    theirs = whisper.load_model(str(path), device="cpu")  # openai-whisper itself reads it
    ours, _ = load_student(path)
    assert theirs.dims == ours.dims
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[name]), name


def test_the_student_is_served_as_a_variant(distilled, clips):
    root, _ = distilled
    with Server(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", MODELS_DIR=str(root / "models")) as server:
        listed = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
        assert "available" not in listed["tiny.en:distilled+int8+flash"]
        jfk = clips["jfk"]
        for variant in ("distilled", "distilled+int8+flash"):
            response = httpx.post(
                f"{server.url}/v1/audio/transcriptions",
                files={"file": (jfk.path.name, jfk.data)},
                data={"model": f"tiny.en:{variant}", "response_format": "verbose_json", "reference": jfk.text},
                timeout=120,
            )
            assert response.status_code == 200, response.text
            assert response.headers["X-Model"] == f"tiny.en:{variant}"
            # A student of 16 windows (4 minutes of audio) and 3 epochs is near its initialization
            # (the teacher's first and last layers) and tends to repeat phrases, so its WER says
            # little (seen: 0.55 and 1.05, mostly insertions). What is checked: it hears the clip's
            # words (most distinct reference words appear), and it is not the teacher's answer
            # (tiny.en: WER 0 on this clip), so the student is what answered.
            text = response.json()["text"]
            reference_words = set(normalize(jfk.text).split())
            heard = reference_words & set(normalize(text).split())
            assert len(heard) >= 0.6 * len(reference_words), text
            assert english_wer([jfk.text], [text]) > 0, text


def test_a_missing_student_is_listed_unavailable_and_refused(http):
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    card = listed["tiny.en:distilled"]
    assert card["available"] is False and "python -m optim.distill --teacher tiny.en" in card["unavailable_reason"]
    response = http.post(
        "/v1/audio/transcriptions",
        files={"file": ("jfk.flac", (DATA / "jfk.flac").read_bytes())},
        data={"model": "tiny.en:distilled"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "variant_unavailable" and "python -m optim.distill --teacher tiny.en" in error["message"]
