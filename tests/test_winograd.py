"""The `winograd` variant computes the encoder's convolutions exactly (up to float rounding):
the transforms are exact in float64, WinogradConv1d equals F.conv1d for any length and
stride, and on tiny.en with a real clip the encoder output and the greedy tokens are kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import whisper

from optim.audio import decode_audio
from optim.variants.winograd import WinogradConv1d, apply_winograd, winograd_transforms

# Largest |Winograd - F.conv1d|, relative to the largest |F.conv1d output|, in float32.
# Measured on random data (channels 80..512, lengths 1..3000, stride 1 and 2): up to 1.1e-6
# for m = 2, 2.5e-6 for m = 4, 4.8e-6 for m = 6 (direct float32 convolution against float64:
# 3e-7). The rounding grows with m because the transform constants do; 2e-5 leaves 4x margin
# at m = 6 and would still catch any wrong tap or tile (errors of order 1).
FLOAT32_TOLERANCE = 2e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("m,r", [(2, 3), (4, 3), (6, 3), (2, 2), (4, 2)])
def test_transforms_are_exact_in_float64(m, r):
    input_transform, filter_transform, output_transform = winograd_transforms(m, r)
    n = m + r - 1
    assert input_transform.shape == (n, n) and filter_transform.shape == (n, r) and output_transform.shape == (m, n)
    if n - 1 <= 5:  # integer points only: the per-tile transform B^T is integral
        assert torch.equal(input_transform, input_transform.round())
    generator = torch.Generator().manual_seed(m * 10 + r)
    tiles = torch.randn(1000, n, dtype=torch.float64, generator=generator)
    filters = torch.randn(1000, r, dtype=torch.float64, generator=generator)
    winograd = ((tiles @ input_transform.T) * (filters @ filter_transform.T)) @ output_transform.T
    direct = torch.stack([(tiles[:, i : i + r] * filters).sum(dim=1) for i in range(m)], dim=1)
    assert (winograd - direct).abs().max().item() < 1e-12


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("m", [2, 4, 6])
def test_equals_conv1d(stride, m):
    torch.manual_seed(stride * 10 + m)
    conv = torch.nn.Conv1d(24, 40, kernel_size=3, stride=stride, padding=1)
    winograd = WinogradConv1d(conv, m)
    # odd lengths, lengths shorter than a tile, not a multiple of m, a multiple of m
    for length in (1, 2, 3, 4, 5, 7, 12, 13, 25, 96, 301):
        x = torch.randn(3, 24, length)
        with torch.no_grad():
            expected = F.conv1d(x, conv.weight, conv.bias, stride=stride, padding=1)
            actual = winograd(x)
        assert actual.shape == expected.shape
        assert relative_error(actual, expected) < FLOAT32_TOLERANCE, (stride, m, length)


def test_computes_in_the_input_dtype():
    conv = torch.nn.Conv1d(8, 16, kernel_size=3, stride=2, padding=1)
    winograd = WinogradConv1d(conv)
    x = torch.randn(2, 8, 50, dtype=torch.float64)
    with torch.no_grad():
        actual = winograd(x)
        expected = F.conv1d(x, conv.weight.double(), conv.bias.double(), stride=2, padding=1)
    assert actual.dtype == torch.float64
    assert winograd.filters.dtype == torch.float32
    # float64 arithmetic on float32-rounded transformed filters: float32-level agreement
    assert relative_error(actual, expected) < FLOAT32_TOLERANCE


def test_rejects_other_convolutions():
    with pytest.raises(ValueError):
        WinogradConv1d(torch.nn.Conv1d(8, 8, kernel_size=5, padding=2))
    with pytest.raises(ValueError):
        WinogradConv1d(torch.nn.Conv1d(8, 8, kernel_size=3, padding=1, bias=False))


@pytest.fixture(scope="module")
def jfk_mel(clips) -> torch.Tensor:
    samples = decode_audio(clips["jfk"].data).samples
    mel = whisper.log_mel_spectrogram(torch.from_numpy(samples), padding=whisper.audio.N_SAMPLES)
    return whisper.pad_or_trim(mel, whisper.audio.N_FRAMES)


@pytest.fixture(scope="module")
def winograd_tiny(tiny_model):
    return apply_winograd(copy.deepcopy(tiny_model))  # the shared fixture stays untouched


def test_real_convolutions(tiny_model, winograd_tiny, jfk_mel):
    encoder, variant = tiny_model.encoder, winograd_tiny.encoder
    assert isinstance(variant.conv1, WinogradConv1d) and isinstance(variant.conv2, WinogradConv1d)
    with torch.no_grad():
        conv1 = encoder.conv1(jfk_mel[None])
        conv2_input = F.gelu(conv1)
        conv2 = encoder.conv2(conv2_input)
        # measured (m = 4): conv1 6.9e-7, conv2 2.9e-7
        assert relative_error(variant.conv1(jfk_mel[None]), conv1) < FLOAT32_TOLERANCE
        assert relative_error(variant.conv2(conv2_input), conv2) < FLOAT32_TOLERANCE


def test_real_encoder_and_tokens(tiny_model, winograd_tiny, jfk_mel):
    with torch.no_grad():
        expected = tiny_model.embed_audio(jfk_mel[None])
        actual = winograd_tiny.embed_audio(jfk_mel[None])
    # Measured 1.9e-6 relative (m = 4). The four blocks amplify any rounding of the
    # convolutions: computing them exactly, in float64, moves the output by 1.5e-6 as well, so
    # Winograd costs no more than the direct float32 convolution's own rounding. 2e-5: 10x margin.
    assert relative_error(actual, expected) < 2e-5
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    assert whisper.decode(winograd_tiny, jfk_mel, options).tokens == whisper.decode(tiny_model, jfk_mel, options).tokens
