"""Distil-whisper style models as Hugging Face (transformers) folders: a student of tiny.en
with 2 decoder layers (its whole 4-layer encoder) written by `save_hf_folder` loads back here
exactly (same tensors, heads and greedy tokens) and is read by transformers itself; fp16
weights, sharded weights, 128 mel bins (large-v3 and its students) and the alignment-head
fallbacks load too. tiny.en only, no download: about 20 s on a 2-core CPU."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import whisper
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from whisper.model import ModelDimensions
from whisper.tokenizer import get_tokenizer

from optim.audio import decode_audio
from optim.decoding import WindowInput, decode_batch
from optim.student import make_student
from optim.weights import load_whisper, save_hf_folder

transformers = pytest.importorskip("transformers")

# <|startoftranscript|><|notimestamps|> And so: a teacher-forced prefix of the jfk clip
PREFIX = torch.tensor([[50257, 50362, 843, 523]])


@pytest.fixture(scope="module")
def jfk(clips) -> np.ndarray:
    return decode_audio(clips["jfk"].data).samples


def _mel(samples: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """(1, n_mels, 3000): the clip padded to 30 s, as openai-whisper's decode() sees it."""
    mel = whisper.log_mel_spectrogram(torch.from_numpy(samples), n_mels, padding=whisper.audio.N_SAMPLES)
    return whisper.pad_or_trim(mel, whisper.audio.N_FRAMES)[None]


@pytest.fixture(scope="module")
def student(tiny_model):
    return make_student(tiny_model, 2)  # decoder layers 0 and 3 of tiny.en's 4


@pytest.fixture(scope="module")
def student_folder(student, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny.en-student"
    save_hf_folder(student, folder)
    return folder


def _logits(model, mel: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(PREFIX, model.embed_audio(mel))


def _heads(model) -> list[list[int]]:
    return model.alignment_heads.to_dense().nonzero().tolist()


def test_student_round_trip(student, student_folder, tiny_model, jfk):
    """Written and read back: the same dimensions, tensors and alignment heads, and greedy
    decoding of a real clip through the service's batched decoder gives the same tokens, with
    the same log-probabilities to the bit. (This untrained student only says " The" between two
    timestamps: the equal tensors here and the teacher-forced logits of the next test are the
    finer checks.)"""
    loaded = load_whisper(student_folder)
    assert loaded.dims == ModelDimensions(**{**vars(tiny_model.dims), "n_text_layer": 2})
    assert loaded.dims.n_audio_layer == 4  # the teacher's whole encoder
    ours, theirs = student.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert _heads(loaded) == _heads(student) == [[1, h] for h in (0, 1, 2, 3, 4)]  # tiny.en's layer-3 heads

    frames = len(jfk) // whisper.audio.HOP_LENGTH
    window = WindowInput(mel=_mel(jfk)[0, :, :frames], language="en")
    tokenizer = get_tokenizer(False)
    with torch.inference_mode():
        (expected,), _ = decode_batch(student, tokenizer, [window], shorten_context=False)
        (got,), _ = decode_batch(loaded, tokenizer, [window], shorten_context=False)
    assert len(expected.tokens) > 0
    assert got.tokens == expected.tokens
    assert got == expected  # every field: text, avg_logprob, no_speech_prob, ...


def test_transformers_reads_the_student(student, student_folder, jfk):
    """transformers' own Whisper, loading the folder, computes our student's logits (its
    encoder and 2-layer decoder are what the config says), and has the alignment heads."""
    hf_model = transformers.WhisperForConditionalGeneration.from_pretrained(student_folder).eval()
    assert (hf_model.config.encoder_layers, hf_model.config.decoder_layers) == (4, 2)
    assert hf_model.generation_config.alignment_heads == _heads(student)
    mel = _mel(jfk)
    with torch.inference_mode():
        theirs = hf_model(input_features=mel, decoder_input_ids=PREFIX).logits
    # two implementations of the same float32 math: torch's float32 tolerance (measured: identical)
    torch.testing.assert_close(theirs, _logits(student, mel))


def test_fp16_safetensors(student, tmp_path, jfk):
    """distil-whisper ships fp16 weights: they load as float32, exactly the fp16-rounded values,
    and compute the float32 model's logits to within fp16 rounding."""
    # tiny.en's weights are fp16 values already (its weight package stores fp16), so rounding
    # its copies again would change nothing: stand in a fine-tuned student, whose float32
    # weights fp16 cannot hold exactly (each nudged by ~0.1 %, as a few training steps would).
    tuned = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.mul_(1 + 1e-3 * torch.randn(parameter.shape, generator=generator))
    folder = tmp_path / "fp16"
    save_hf_folder(tuned, folder)
    weights = folder / "model.safetensors"
    save_file({name: t.half() for name, t in load_file(weights).items()}, weights, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    with safe_open(weights, framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F16"}

    loaded = load_whisper(folder)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ours, theirs = tuned.state_dict(), loaded.state_dict()
    assert all(torch.equal(theirs[name], t.half().float()) for name, t in ours.items())
    assert sum(not torch.equal(theirs[name], t) for name, t in ours.items()) > 100  # really rounded (of 119)
    mel = _mel(jfk)
    expected, got = _logits(tuned, mel), _logits(loaded, mel)
    # Each weight is rounded to fp16 (relative error <= 2^-11, about 5e-4); the arithmetic stays
    # float32. Through 4 encoder and 2 decoder layers that moves these logits (magnitude up to
    # ~27) by at most 0.019, 0.006 on average (measured, 3 seeds: 0.014 to 0.019). atol 0.05
    # leaves a 2.5x margin for other CPUs' summation orders, and is still below what loading the
    # un-tuned weights instead would change (0.06 to 0.10) and far below a wrong tensor (~24).
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))  # the same next tokens


def test_sharded_safetensors(student, student_folder, tmp_path):
    """A model over save_pretrained's shard size comes in parts with an index: read as one."""
    folder = tmp_path / "sharded"
    hf_model = transformers.WhisperForConditionalGeneration.from_pretrained(student_folder)
    hf_model.save_pretrained(folder, max_shard_size="40MB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    loaded = load_whisper(folder)
    ours, theirs = student.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert _heads(loaded) == _heads(student)  # transformers kept them in generation_config.json


def test_alignment_heads_fallbacks(student_folder, tmp_path, caplog):
    """Without a generation config, or with one naming layers the model does not have (a
    distilled folder carrying its teacher's heads), word timing uses the default heads: every
    head of the decoder's second half, here its last layer (not tiny.en's, which need 4 layers)."""
    default = [[1, h] for h in range(6)]
    folder = tmp_path / "no-generation-config"
    shutil.copytree(student_folder, folder)
    (folder / "generation_config.json").unlink()
    assert _heads(load_whisper(folder)) == default

    teacher_heads = [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]  # tiny.en's
    (folder / "generation_config.json").write_text(json.dumps({"alignment_heads": teacher_heads}))
    with caplog.at_level("WARNING", logger="optim.weights"):
        assert _heads(load_whisper(folder)) == default
    assert "do not fit a decoder of 2 layers" in caplog.text


def test_128_mel_bins(tmp_path, jfk):
    """large-v3's 128 mel bins and 100-language vocabulary, on a tiny random-weight model
    written by transformers itself: the dimensions follow the config, and the forward pass over
    a real clip's 128-bin log-mel gives transformers' logits."""
    config = transformers.WhisperConfig(
        vocab_size=51866, num_mel_bins=128, d_model=64, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256,
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50256, bos_token_id=50257,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = transformers.WhisperForConditionalGeneration(config).eval()
    folder = tmp_path / "mel128"
    hf_model.save_pretrained(folder)

    model = load_whisper(folder)
    assert model.dims.n_mels == 128
    assert (model.dims.n_audio_layer, model.dims.n_text_layer, model.dims.n_audio_state) == (1, 1, 64)
    assert model.is_multilingual and model.num_languages == 100
    mel = _mel(jfk, n_mels=128)
    assert mel.shape == (1, 128, 3000)
    tokenizer = get_tokenizer(True, num_languages=100, language="en")
    tokens = torch.tensor([tokenizer.sot_sequence_including_notimestamps])
    assert tokens.tolist() == [[50258, 50259, 50360, 50364]]  # large-v3's ids (one more language than base)
    with torch.inference_mode():
        theirs = hf_model(input_features=mel, decoder_input_ids=tokens).logits
        ours = model.logits(tokens, model.embed_audio(mel))
    torch.testing.assert_close(ours, theirs)
