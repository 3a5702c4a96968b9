"""The CTranslate2 → openai-whisper conversion is exact: same parameters, and greedy decoding
gives token for token what CTranslate2 itself (faster-whisper's engine) gives on the same file."""

from __future__ import annotations

import json

import ctranslate2
import numpy as np
import pytest
import torch
import whisper
from whisper.decoding import DecodingOptions

from optim.audio import decode_audio
from optim.weights import (
    BUNDLED_MODELS,
    bundled_model_files,
    ctranslate2_folder,
    hf_whisper_config,
    load_whisper,
    read_ctranslate2,
    save_hf_folder,
    save_openai_checkpoint,
)

# Published parameter counts of the official checkpoints (WEIGHTS.md).
PARAMETERS = {"tiny.en": 37_184_256, "base": 71_825_920}


@pytest.fixture(scope="module")
def models(tiny_model, base_model):
    return {"tiny.en": tiny_model, "base": base_model}


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_bundled_model_loads_strictly(models, name):
    model = models[name]
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    assert model.is_multilingual == (name == "base")
    # strict=True already passed inside the loader; check the tied output projection too
    variables = read_ctranslate2(bundled_model_files(name)[0])
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    # alignment heads from config.json (used by word timestamps), not openai-whisper's default
    assert model.alignment_heads.to_dense().sum().item() == 8


def _mel(samples: np.ndarray) -> torch.Tensor:
    mel = whisper.log_mel_spectrogram(torch.from_numpy(samples), padding=whisper.audio.N_SAMPLES)
    return whisper.pad_or_trim(mel, whisper.audio.N_FRAMES)


@pytest.mark.parametrize(
    "name,clip_ids",
    [("tiny.en", ["jfk", "lj-LJ001-0001", "lj-LJ001-0003"]), ("base", ["jfk", "lj-LJ001-0004", "pv-de"])],
)
def test_greedy_tokens_match_ctranslate2(models, clips, tmp_path, name, clip_ids):
    model = models[name]
    ct2 = ctranslate2.models.Whisper(str(ctranslate2_folder(name, tmp_path)), device="cpu", compute_type="float32")
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    for clip_id in clip_ids:
        clip = clips[clip_id]
        mel = _mel(decode_audio(clip.data).samples)
        features = ctranslate2.StorageView.from_array(mel[None].numpy())

        if model.is_multilingual:  # language identification agrees too
            _, ours = model.detect_language(mel[None])
            theirs = dict(ct2.detect_language(features)[0])
            top = max(ours[0], key=ours[0].get)
            assert f"<|{top}|>" == max(theirs, key=theirs.get) == f"<|{clip.lang}|>"
            assert abs(ours[0][top] - theirs[f"<|{top}|>"]) < 1e-3

        prompt = [tokenizer.sot, tokenizer.to_language_token(clip.lang), tokenizer.transcribe, tokenizer.no_timestamps]
        if not model.is_multilingual:
            prompt = [tokenizer.sot, tokenizer.no_timestamps]
        theirs = ct2.generate(features, [prompt], beam_size=1, max_length=224)[0].sequences_ids[0]
        options = DecodingOptions(language=clip.lang, without_timestamps=True, fp16=False, temperature=0.0)
        ours = whisper.decode(model, mel, options).tokens
        assert ours == theirs, f"{name} {clip_id}: {tokenizer.decode(ours)!r} != {tokenizer.decode(theirs)!r}"
        assert len(ours) > 0


def test_openai_checkpoint_round_trip(tiny_model, tmp_path, clips):
    """A model saved as a standard openai-whisper .pt loads in openai-whisper itself and here."""
    path = tmp_path / "tiny.en.pt"
    save_openai_checkpoint(tiny_model, path)
    theirs = whisper.load_model(str(path), device="cpu")  # openai-whisper's own loader (strict)
    ours = load_whisper(path)
    mel = _mel(decode_audio(clips["jfk"].data).samples)[None]
    tokens = torch.tensor([[50257, 50362]])  # <|startoftranscript|><|notimestamps|> for tiny.en
    with torch.inference_mode():
        expected = tiny_model.logits(tokens, tiny_model.embed_audio(mel))
        assert torch.equal(ours.logits(tokens, ours.embed_audio(mel)), expected)
        assert torch.equal(theirs.logits(tokens, theirs.embed_audio(mel)), expected)
    # the .pt carries no alignment heads; the loader recognises tiny.en and sets its published ones
    assert torch.equal(ours.alignment_heads.to_dense(), tiny_model.alignment_heads.to_dense())


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Whisper model"):
        load_whisper(tmp_path / "missing.pt")


# the token ids of a transformers config, in this order in the checks below
TOKEN_IDS = ("vocab_size", "decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id")


def test_hugging_face_folder(tiny_model, clips, tmp_path):
    """`save_hf_folder` writes tiny.en as a transformers folder: transformers' own Whisper,
    reading it, computes the same logits as openai-whisper (so the name mapping is right), its
    config has openai/whisper-tiny.en's token ids, and the folder loads back here exactly."""
    import transformers

    folder = tmp_path / "hf-tiny.en"
    save_hf_folder(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    # openai/whisper-tiny.en's config.json: start <|startoftranscript|>, end and padding <|endoftext|>
    assert [config[k] for k in TOKEN_IDS] == [51864, 50257, 50256, 50256, 50257]
    hf_model = transformers.WhisperForConditionalGeneration.from_pretrained(folder).eval()

    mel = _mel(decode_audio(clips["jfk"].data).samples)[None]
    tokens = torch.tensor([[50257, 50362, 843, 523]])  # <|startoftranscript|><|notimestamps|> And so
    with torch.inference_mode():
        expected = tiny_model.logits(tokens, tiny_model.embed_audio(mel))
        theirs = hf_model(input_features=mel, decoder_input_ids=tokens).logits
    # two implementations of the same float32 math: torch's float32 tolerance (measured: identical)
    torch.testing.assert_close(theirs, expected)

    loaded = load_whisper(folder)
    with torch.inference_mode():
        assert torch.equal(loaded.logits(tokens, loaded.embed_audio(mel)), expected)
    assert torch.equal(loaded.alignment_heads.to_dense(), tiny_model.alignment_heads.to_dense())


def test_hugging_face_config_multilingual(base_model):
    """A multilingual model's config has openai/whisper-base's token ids (one place further on)."""
    pytest.importorskip("transformers")
    config = hf_whisper_config(base_model)
    assert [getattr(config, k) for k in TOKEN_IDS] == [51865, 50258, 50257, 50257, 50257]
    assert (config.encoder_layers, config.decoder_layers, config.d_model, config.encoder_ffn_dim) == (6, 6, 512, 2048)


def test_first_use_of_an_int8_default_variant_builds_it_without_a_load_first():
    """built() on a store not loaded yet, for its int8 default: loading builds that variant under
    the same per-variant build lock, which once deadlocked here (a benchmark hung, idle)."""
    from concurrent.futures import ThreadPoolExecutor

    from optim.models import ModelStore

    store = ModelStore({"tiny.en": "tiny.en"}, device="cpu", default_variant="int8+flash")
    pool = ThreadPoolExecutor(1)  # not `with`: a hung build must fail the test, not hang its exit
    try:
        built = pool.submit(store.built, store.ref("tiny.en", store.variant("int8+flash"))).result(timeout=120)
    finally:
        pool.shutdown(wait=False)
    assert str(built.ref) == "tiny.en:int8+flash" and store.loaded["tiny.en"].float_source is None
