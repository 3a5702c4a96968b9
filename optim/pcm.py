"""Raw PCM as a stream: 16-bit little-endian mono samples, and a streaming polyphase resampler to
the service's 16 kHz.

A realtime client sends audio in small pieces (OpenAI's Realtime API: 24 kHz PCM16, base64, in
20-100 ms chunks). Each piece is resampled as it comes, so that the VAD and the turn buffers see
16 kHz audio at once, and resampling the pieces one by one gives the same samples, bit for bit,
as resampling the whole stream in one go (no clicks at chunk boundaries).

The filter is a Kaiser-windowed sinc on the upsampled grid (48 kHz for 24 → 16 kHz) reaching
4.5 ms either side of each output: flat (within 0.01 dB) to 7 kHz, -0.3 dB at 7.5 kHz and
90 dB down from 8.5 kHz, which Whisper's features (80 mel bands up to 8 kHz) cannot tell from
ideal. Each push holds back the last 4.5 ms, which come out with the next one.
"""

from __future__ import annotations

from math import gcd

import numpy as np

from optim.audio import SAMPLE_RATE
from optim.errors import InvalidRequest

PCM16_SCALE = 32768.0
HALF_WIDTH = 72  # filter reach either side of each output, in samples of the lower of the two rates
KAISER_BETA = 8.0  # about 80 dB of stopband attenuation
ROLLOFF = 0.96  # cutoff as a fraction of the output Nyquist frequency


def pcm16_to_float(data: bytes) -> np.ndarray:
    """16-bit little-endian mono PCM → float32 in [-1, 1)."""
    if len(data) % 2:
        raise InvalidRequest(f"PCM16 audio must be whole 16-bit samples; got {len(data)} bytes (an odd count)", "audio")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM16_SCALE


def lowpass(up: int, down: int, half_width: int = HALF_WIDTH, beta: float = KAISER_BETA, rolloff: float = ROLLOFF) -> np.ndarray:
    """The anti-aliasing filter on the upsampled grid (rate × up), unit gain at DC per phase."""
    taps = 2 * half_width * max(up, down) + 1
    cutoff = rolloff / (2 * max(up, down))  # cycles per upsampled sample
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, beta)
    return h / h.sum()


class Resampler:
    """Streaming `rate` → 16 kHz. `push(samples)` returns every output sample that the input so far
    determines; the last 4.5 ms (the filter's reach) come out with the next push.
    At 16 kHz it passes samples through."""

    def __init__(self, rate: int, out_rate: int = SAMPLE_RATE):
        if rate <= 0:
            raise ValueError(f"sample rate must be positive: {rate}")
        self.rate = rate
        g = gcd(rate, out_rate)
        self.up, self.down = out_rate // g, rate // g
        self.passthrough = self.up == self.down == 1
        if self.passthrough:
            return
        h = lowpass(self.up, self.down)
        self.delay = (len(h) - 1) // 2  # the centre tap: output m is centred on input m·down/up
        self.taps = -(-len(h) // self.up)  # input samples per output
        # One weight row per phase: weights[φ][t] multiplies input j_hi - t, where φ = (m·down + delay) mod up.
        padded = np.zeros(self.taps * self.up)
        padded[: len(h)] = h
        self.weights = (padded.reshape(self.taps, self.up).T * self.up).astype(np.float32)  # (up, taps)
        # Input kept for the next outputs, with the stream's start padded by zeros.
        self._buffer = np.zeros(self.taps, dtype=np.float32)
        self._buffer_start = -self.taps  # stream index of _buffer[0]
        self._received = 0  # input samples so far
        self._produced = 0  # output samples so far

    def push(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32)
        if self.passthrough:
            return samples
        self._buffer = np.concatenate([self._buffer, samples])
        self._received += len(samples)
        # Output m needs inputs up to j_hi(m) = (m·down + delay) // up ≤ received - 1.
        last = (self._received * self.up - 1 - self.delay) // self.down
        m = np.arange(self._produced, last + 1)
        if len(m) == 0:
            return np.zeros(0, dtype=np.float32)
        centre = m * self.down + self.delay
        j_hi, phase = centre // self.up, centre % self.up
        index = (j_hi - self._buffer_start)[:, None] - np.arange(self.taps)[None, :]
        out = np.einsum("mt,mt->m", self._buffer[index], self.weights[phase])
        self._produced = last + 1
        # Keep what the next output's taps reach back to.
        keep_from = (self._produced * self.down + self.delay) // self.up - (self.taps - 1)
        drop = max(0, keep_from - self._buffer_start)
        if drop:
            self._buffer = self._buffer[drop:]
            self._buffer_start += drop
        return out.astype(np.float32)
