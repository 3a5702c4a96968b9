"""Batched greedy decoding of independent ≤30-s windows, with timestamps.

openai-whisper's `decode()` accepts a batch, but every row shares one prompt length, the
encoder always sees 30 s, and a finished row keeps being fed until the longest one ends. Here:

* the encoder runs over each window's own length, rounded up (`audio_context`), instead of
  always 3000 mel frames, when the caller asks for a shortened context. Each row's context is its
  own, not the batch's longest: a window's words do not depend on what shares its batch (a
  streamed request's first window, decoded alone, gets the words the whole file gets), and a
  short window is not encoded over a long neighbour's padding. The cross-attention, too, runs
  over each row's own audio: rows are ordered by context, and each run of rows of one context
  attends over its own keys/values. Padding them to the longest with a mask was not enough:
  SDPA over 1000 positions of which 250 masked does not round as SDPA over 750 (base int8+flash:
  "Panartes ... Subeacco" alone, "Panerks ... Subiaco" beside a 17-s window), and the padding
  cost memory;
* rows may carry prompts of different lengths: the prompt is right-padded, every row keeps
  its own position in a preallocated key/value cache, and each run of rows at one length
  attends over its own keys, so that here too a row computes what it computes alone;
* cross-attention keys/values are computed once per batch and shared by language detection
  and decoding;
* a row leaves the batch as soon as it emits end-of-text, so finished rows cost nothing;
* each row has its own temperature (0 = greedy), so fallback re-decodes join any batch, and its
  own seeded sampler, so what a hot row draws does not depend on what shares its batch.

The logit rules are openai-whisper's own (`SuppressBlank`, `SuppressTokens`,
`ApplyTimestampRules`), applied to the sampled tokens only. With a shortened audio context
two guards bound the model's tendency to behave as if 30 s were present: no timestamp past
the window's real end, and a token budget per second of audio; a row that trips the budget or
looks like a loop is reported as failed so the caller re-decodes it with the full context.

The attention math follows the variant's declaration (`Variant.fused_attention`): `flash`
models use PyTorch's fused SDPA, the others the explicit softmax of the reference.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from whisper.audio import CHUNK_LENGTH, N_FRAMES
from whisper.decoding import ApplyTimestampRules, SuppressBlank, SuppressTokens
from whisper.model import MultiHeadAttention, Whisper
from whisper.tokenizer import Tokenizer
from whisper.utils import compression_ratio as get_compression_ratio

FRAMES_PER_SECOND = 100  # mel frames (10 ms hop)
SAMPLE_LEN = 224  # openai-whisper's default: at most half the text context per window
MAX_INITIAL_TIMESTAMP = 1.0  # seconds; openai-whisper's default
# Token budget per window when the encoder context is shortened: generous for fast speech
# (about 3 words a second is 4–5 tokens), small next to the loops it is there to stop.
BUDGET_BASE_TOKENS, BUDGET_TOKENS_PER_SECOND = 10, 8
END_GUARD_SECONDS = 0.5  # with a short context, a closing timestamp this near the end ends the row


@dataclass
class WindowInput:
    mel: Tensor  # (n_mels, frames): this window's log-mel frames, no padding
    language: str | None  # None: detect
    prompt: list[int] = field(default_factory=list)  # text tokens of the prompt (already cut to fit)
    temperature: float = 0.0
    full_context: bool = False  # this row needs the 30-s encoder context
    seed: int = 0  # of this row's own sampler (temperature > 0): its draws do not depend on its batch-mates
    # True once nobody waits for this row (its client left): it leaves the batch at the next step,
    # so a departed request costs its batch-mates at most one more decoding step.
    abandoned: Callable[[], bool] = lambda: False  # noqa: E731

    @property
    def frames(self) -> int:
        return self.mel.shape[-1]


@dataclass
class WindowOutput:
    tokens: list[int]  # sampled tokens without end-of-text: text and timestamp tokens
    text: str
    language: str
    temperature: float
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    guard_tripped: bool  # a shortened-context guard stopped it: token budget, or a phrase on repeat


@dataclass
class BatchStats:
    batch_size: int
    encoder_frames: list[int]  # mel frames the encoder ran over, per row (its context)
    content_frames: list[int]  # real frames per row
    decoder_steps: list[int]  # tokens sampled per row

    @property
    def encoder_padding(self) -> float:
        """Share of the encoder's input that is padding: 1 − Σ frames / Σ contexts. This is work
        really spent: the 30-s context, or the 15-s minimum and the rounding up of a shortened one."""
        return 1 - sum(self.content_frames) / sum(self.encoder_frames)

    @property
    def length_padding(self) -> float:
        """1 − Σ frames / (rows × longest): how well the batch's windows match in length, which
        is what the scheduler's grouping controls (the context floor aside)."""
        return 1 - sum(self.content_frames) / (self.batch_size * max(self.content_frames))

    @property
    def decoder_padding(self) -> float:
        longest = max(self.decoder_steps, default=0)
        return 1 - sum(self.decoder_steps) / (self.batch_size * longest) if longest else 0.0


def audio_context(frames: int, shorten: bool, step: int = 500, minimum: int = 1500) -> int:
    """Mel frames the encoder runs over for a window of `frames`: 3000 (30 s, as openai-whisper),
    or the window rounded up to `step` frames and at least `minimum`, so that windows of similar
    length share a shape (and a batch's rows mostly one context)."""
    if not shorten:
        return N_FRAMES
    return min(N_FRAMES, max(minimum, -(-frames // step) * step))


def encode(model: Whisper, mel: Tensor) -> Tensor:
    """The audio encoder over (batch, n_mels, frames) for any even `frames` ≤ 3000: openai-whisper's
    forward with the positional embedding cut to the context instead of asserting 1500.

    On CPU one window at a time: the same result (every layer is row- or window-local), 22 %
    faster for int8 at batch 8 (4 % for float32), and a batch's working memory is one window's.
    A whole batch's activations (8 × 1500 × 2048 floats, 98 MB for one of base's MLP layers) are
    above glibc's mmap threshold, so each of them was fresh memory, page-faulted in and given
    back at every layer; one window's (12 MB) are reused from the heap."""
    if mel.device.type == "cpu" and mel.shape[0] > 1:
        return torch.cat([_encode(model, window[None]) for window in mel])
    return _encode(model, mel)


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads for this OS thread while the block runs (None: as they are).
    The count is the calling thread's own (OpenMP's), so another lane keeps its threads."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_windows(model: Whisper, windows: list["WindowInput"], contexts: list[int], dtype: torch.dtype) -> list[Tensor]:
    """Each window's encoder output over its own context (its log-mel zero-padded to it, as in
    openai-whisper's transcribe()), the windows of one context in one call."""
    outputs: list[Tensor] = [None] * len(windows)  # type: ignore[list-item]
    for context in sorted(set(contexts)):
        rows = [i for i, c in enumerate(contexts) if c == context]
        mel = torch.zeros(len(rows), windows[0].mel.shape[0], context, dtype=dtype, device=model.device)
        for j, i in enumerate(rows):
            mel[j, :, : windows[i].frames] = windows[i].mel[:, :context].to(model.device, dtype)
        for j, audio in zip(rows, encode(model, mel)):
            outputs[j] = audio
    return outputs


def _encode(model: Whisper, mel: Tensor) -> Tensor:
    encoder = model.encoder
    if mel.shape[-1] == N_FRAMES:
        return encoder(mel)
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = (x + encoder.positional_embedding[: x.shape[1]]).to(x.dtype)
    for block in encoder.blocks:
        x = block(x)
    return encoder.ln_post(x)


class KVCache:
    """Per-layer self-attention keys/values, (rows, capacity, width), each row at its own length,
    and cross-attention keys/values per run of consecutive rows with one audio context
    (`runs`: (first row, rows) of each; per layer one (rows, context, width) pair per run)."""

    def __init__(self, model: Whisper, rows: int, capacity: int, audio: list[Tensor], fused_attention: bool = False):
        decoder = model.decoder
        self.fused_attention = fused_attention  # SDPA instead of the explicit softmax
        width = model.dims.n_text_state
        first = audio[0]
        # zeros, not empty: masked slots get zero weight, but 0 × NaN from stale memory is NaN
        self.self_kv = [
            (first.new_zeros(rows, capacity, width), first.new_zeros(rows, capacity, width)) for _ in decoder.blocks
        ]
        # cross-attention keys/values: computed once, shared by language detection and decoding
        self.runs = _runs([a.shape[0] for a in audio])
        self.cross_kv = _cross_kv(decoder, audio, self.runs)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=first.device)

    def probe(self, rows: Tensor) -> "KVCache":
        """A one-token cache for `rows`, sharing their cross-attention keys/values (language detection)."""
        probe = KVCache.__new__(KVCache)
        probe.fused_attention = self.fused_attention
        probe.self_kv = [(k[rows, :1].clone(), v[rows, :1].clone()) for k, v in self.self_kv]
        picked = self._in_runs(rows.tolist())
        probe.runs = _runs([run for run, local in enumerate(picked) for _ in local])
        probe.cross_kv = [[(k[local], v[local]) for (k, v), local in zip(layer, picked) if local] for layer in self.cross_kv]
        probe.lengths = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
        return probe

    def keep(self, rows: list[int]) -> None:
        """Drop finished rows (they stop costing work), in place: each kept row moves down into
        the first free slot of the same buffers, and the buffers are cut to the rows kept. An
        indexed copy (`k[rows]`) would hold a second set of every buffer while it is made: for 8
        rows of 30-s windows the cross-attention keys/values alone are 295 MB (base)."""
        _compact(self.self_kv, rows)
        self.self_kv = [(k[: len(rows)], v[: len(rows)]) for k, v in self.self_kv]
        kept = self._in_runs(rows)
        for layer in self.cross_kv:
            for pair, local in zip(layer, kept):
                _compact([pair], local)
        self.cross_kv = [[(k[: len(local)], v[: len(local)]) for (k, v), local in zip(layer, kept) if local] for layer in self.cross_kv]
        self.runs = _runs([run for run, local in enumerate(kept) for _ in local])
        self.lengths = self.lengths[torch.tensor(rows, device=self.lengths.device)]

    def _in_runs(self, rows: list[int]) -> list[list[int]]:
        """`rows` (ascending) by run, as indices within their run."""
        return [[i - start for i in rows if start <= i < start + n] for start, n in self.runs]


def _runs(keys: list) -> list[tuple[int, int]]:
    """(first, count) of each run of equal consecutive keys."""
    runs: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if runs and keys[i - 1] == key:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _compact(pairs: list[tuple[Tensor, Tensor]], rows: list[int]) -> None:
    """Move `rows` (ascending) of every (k, v) down into the first slots, in place: slot ≤ row, so a
    row is read before it is overwritten."""
    for slot, row in enumerate(rows):
        if slot != row:
            for k, v in pairs:
                k[slot].copy_(k[row])
                v[slot].copy_(v[row])


def _cross_kv(decoder, audio: list[Tensor], runs: list[tuple[int, int]]) -> list[list[tuple[Tensor, Tensor]]]:
    """Each decoder layer's cross-attention keys/values, one (rows, context, width) pair per run of
    rows with one context, each over its own positions. On CPU a row is projected at a time, as
    in the encoder: a whole batch's projection temporaries (the int8 path's quantized input and
    int32 products, 24.6 MB each for eight 30-s rows of base) were freed into the heap and held
    there, 270 MB beyond the 340 MB of the buffers themselves; one row's are 3 MB. On a GPU a
    run is one call: fewer, larger kernels."""
    per_call = 1 if audio[0].device.type == "cpu" else len(audio)
    kv = []
    for block in decoder.blocks:
        layer = []
        for first, count in runs:
            k = v = None
            for j in range(0, count, per_call):
                x = torch.stack(audio[first + j : first + min(count, j + per_call)])
                gk, gv = block.cross_attn.key(x), block.cross_attn.value(x)
                if len(gk) == count:  # the whole run in one call
                    k, v = gk, gv
                    break
                if k is None:
                    k, v = gk.new_empty(count, *gk.shape[1:]), gv.new_empty(count, *gv.shape[1:])
                k[j : j + len(gk)], v[j : j + len(gv)] = gk, gv
            layer.append((k, v))
        kv.append(layer)
    return kv


def _attend(attn: MultiHeadAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, fused: bool) -> Tensor:
    heads = lambda t: t.view(*t.shape[:2], attn.n_head, -1).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
    else:  # the reference: explicit weights
        w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            w = w.masked_fill(~mask[:, None], float("-inf"))
        out = F.softmax(w.float(), dim=-1).to(q.dtype) @ v
    return out.transpose(1, 2).flatten(start_dim=2)


def decoder_hidden(model: Whisper, tokens: Tensor, cache: KVCache, new_lengths: Tensor) -> Tensor:
    """Run the text decoder over `tokens` (rows, T) appended at each row's own position; each row
    has `new_lengths` real tokens (the rest is padding). Returns the final hidden states."""
    decoder = model.decoder
    rows, n = tokens.shape
    positions = cache.lengths[:, None] + torch.arange(n, device=tokens.device)
    positions = positions.clamp(max=decoder.positional_embedding.shape[0] - 1)
    xa_dtype = cache.cross_kv[0][0][0].dtype
    x = (decoder.token_embedding(tokens) + decoder.positional_embedding[positions].to(xa_dtype)).to(xa_dtype)
    # Self-attention per run of rows at one length with as many new tokens (decode_batch orders
    # rows so), each over its own keys and queries only, as alone: SDPA over a longer neighbour's
    # padding rounds differently (prompts of different lengths moved int8's log-probabilities).
    lengths, new = cache.lengths.tolist(), new_lengths.tolist()
    spans = [(slice(first, first + count), lengths[first] + new[first], new[first]) for first, count in _runs(list(zip(lengths, new)))]
    masks = [torch.arange(keys, device=tokens.device)[None, None, :] <= positions[rows_, :m, None] for rows_, keys, m in spans]  # causal
    row_index = torch.arange(rows, device=tokens.device)[:, None]
    for block, (k_cache, v_cache), cross_kv in zip(decoder.blocks, cache.self_kv, cache.cross_kv):
        attn, cross = block.attn, block.cross_attn
        h = block.attn_ln(x)
        k_cache[row_index, positions] = attn.key(h)
        v_cache[row_index, positions] = attn.value(h)
        q = attn.query(h)
        if len(spans) == 1 and spans[0][2] == n:  # every row alike: one call over all of them
            (_, keys, _), (mask,) = spans[0], masks
            attended = _attend(attn, q, k_cache[:, :keys], v_cache[:, :keys], mask, cache.fused_attention)
        else:  # padding positions stay zero: their outputs are never read
            attended = torch.zeros_like(q)
            for (rows_, keys, m), mask in zip(spans, masks):
                attended[rows_, :m] = _attend(attn, q[rows_, :m], k_cache[rows_, :keys], v_cache[rows_, :keys], mask, cache.fused_attention)
        x = x + attn.out(attended)
        q = cross.query(block.cross_attn_ln(x))
        runs = [_attend(cross, q[first : first + count], ck, cv, None, cache.fused_attention) for (first, count), (ck, cv) in zip(cache.runs, cross_kv)]
        x = x + cross.out(runs[0] if len(runs) == 1 else torch.cat(runs))
        x = x + block.mlp(block.mlp_ln(x))
    cache.lengths = cache.lengths + new_lengths
    return decoder.ln(x)


def logits(model: Whisper, hidden: Tensor) -> Tensor:
    decoder = model.decoder
    if hasattr(decoder, "project"):  # variants (int8 replaces the output projection)
        return decoder.project(hidden)
    return (hidden @ decoder.token_embedding.weight.to(hidden.dtype).T).float()


def suppressed_tokens(tokenizer: Tokenizer) -> list[int]:
    """openai-whisper's default `suppress_tokens="-1"`: non-speech symbols and special tokens."""
    special = [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev, tokenizer.sot_lm]
    if tokenizer.no_speech is not None:
        special.append(tokenizer.no_speech)
    return sorted(set(tokenizer.non_speech_tokens) | set(special))


def detect_languages(model: Whisper, tokenizer: Tokenizer, cache: KVCache, rows: Tensor) -> list[str]:
    """Most likely language of each of `rows`, from one decoder step on <|startoftranscript|>,
    sharing the batch's cross-attention keys/values (no cache rows are written)."""
    probe = cache.probe(rows)
    sot = torch.full((len(rows), 1), tokenizer.sot, device=rows.device)
    scores = logits(model, decoder_hidden(model, sot, probe, probe.lengths + 1))[:, 0]
    language_tokens = torch.tensor(tokenizer.all_language_tokens, device=scores.device)
    best = scores[:, language_tokens].argmax(dim=-1)
    codes = tokenizer.all_language_codes
    return [codes[i] for i in best.tolist()]


def _prefix_length(model: Whisper, window: WindowInput) -> int:
    """Tokens before a window's first sampled one (`_prefill`): <|startofprev|> and its prompt if
    any, <|startoftranscript|>, and on a multilingual model the language and task tokens."""
    return (len(window.prompt) + 1 if window.prompt else 0) + (3 if model.is_multilingual else 1)


def _prefill(
    model: Whisper, tokenizer: Tokenizer, windows: list[WindowInput], cache: KVCache
) -> tuple[list[str | None], list[float], Tensor]:
    """Detect languages where needed, then run each row's prompt and <|startoftranscript|>
    sequence (right-padded to the longest) through the decoder: the languages, the no-speech
    probability of each row, and the logits of its first sampled token."""
    device = cache.lengths.device
    rows = len(windows)
    languages = [w.language for w in windows]
    undetected = [i for i, lang in enumerate(languages) if lang is None]
    if model.is_multilingual and undetected:
        for i, lang in zip(undetected, detect_languages(model, tokenizer, cache, torch.tensor(undetected, device=device))):
            languages[i] = lang
    prefixes, sot_index = [], []
    for w, lang in zip(windows, languages):
        prompt = [tokenizer.sot_prev, *w.prompt] if w.prompt else []
        sot_sequence = [tokenizer.sot]
        if model.is_multilingual:
            sot_sequence += [tokenizer.to_language_token(lang), tokenizer.sot_sequence[-1]]
        sot_index.append(len(prompt))
        prefixes.append(prompt + sot_sequence)
    lengths = torch.tensor([len(p) for p in prefixes], device=device)
    tokens = torch.full((rows, int(lengths.max())), tokenizer.eot, dtype=torch.long, device=device)
    for i, p in enumerate(prefixes):
        tokens[i, : len(p)] = torch.tensor(p)
    hidden = decoder_hidden(model, tokens, cache, lengths)
    every = torch.arange(rows, device=device)
    at_sot = logits(model, hidden[every, torch.tensor(sot_index, device=device)])
    no_speech = at_sot.softmax(dim=-1)[:, tokenizer.no_speech].tolist() if tokenizer.no_speech is not None else [0.0] * rows
    return languages, no_speech, logits(model, hidden[every, lengths - 1])


def decode_batch(
    model: Whisper,
    tokenizer: Tokenizer,
    windows: list[WindowInput],
    shorten_context: bool,
    half: bool = False,
    fused_attention: bool = False,
    encoder_threads: int | None = None,
) -> tuple[list[WindowOutput], BatchStats]:
    """Decode windows of one model, variant and task together (see the module docstring). `half`
    and `fused_attention` come from the variant: float16 compute, SDPA attention.
    `encoder_threads`: torch threads for the encoder only (the scheduler lends a batch that
    starts alone the idle lanes' cores: the encoder's large products split well over cores,
    the decoder's small ones do not)."""
    device = model.device
    dtype = torch.float16 if half else torch.float32
    rows = len(windows)
    frames = [w.frames for w in windows]
    contexts = [audio_context(w.frames, shorten_context and not w.full_context) for w in windows]
    prefixes = [_prefix_length(model, w) for w in windows]
    order = sorted(range(rows), key=lambda i: (contexts[i], prefixes[i]))
    if order != list(range(rows)):  # rows alike together: one attention call per run (KVCache, decoder_hidden)
        outputs, stats = decode_batch(model, tokenizer, [windows[i] for i in order], shorten_context, half, fused_attention, encoder_threads)
        back = sorted(range(rows), key=order.__getitem__)  # where each window went
        fields = (stats.encoder_frames, stats.content_frames, stats.decoder_steps)
        return [outputs[i] for i in back], BatchStats(rows, *([values[i] for i in back] for values in fields))
    shortened = [c < N_FRAMES for c in contexts]
    with torch_threads(encoder_threads):
        audio = encode_windows(model, windows, contexts, dtype)

    durations = [w.frames / FRAMES_PER_SECOND for w in windows]
    budgets = [int(BUDGET_BASE_TOKENS + BUDGET_TOKENS_PER_SECOND * d) for d in durations]
    # Self-attention slots: the longest prefix, then the tokens a row can feed back. A row feeds
    # every sampled token but its last (the loop ends, or the row finishes, on it): at most
    # SAMPLE_LEN - 1, or budget - 1 for a shortened row, which stops at its budget. Sized so,
    # not to SAMPLE_LEN for every row, 8 rows of 10-s windows hold 18 MB of it instead of 45 (base).
    most_tokens = max(min(b, SAMPLE_LEN) if short else SAMPLE_LEN for b, short in zip(budgets, shortened))
    capacity = max(prefixes) + most_tokens - 1
    cache = KVCache(model, rows, capacity, audio, fused_attention)
    del audio  # the cross-attention keys/values are all the decoder needs of the audio
    languages, no_speech, next_logits = _prefill(model, tokenizer, windows, cache)

    precision = CHUNK_LENGTH / model.dims.n_audio_ctx  # 0.02 s per timestamp token
    rules = [
        SuppressBlank(tokenizer, 0),
        SuppressTokens(suppressed_tokens(tokenizer)),
        ApplyTimestampRules(tokenizer, 0, round(MAX_INITIAL_TIMESTAMP / precision)),
    ]
    temperatures = torch.tensor([w.temperature for w in windows], device=device)
    samplers = [torch.Generator(device=device).manual_seed(w.seed) if w.temperature > 0 else None for w in windows]
    # no timestamp past a shortened row's real end (a 30-s row: no bound beyond the vocabulary's)
    last_timestamp = torch.tensor(
        [tokenizer.timestamp_begin + round(d / precision) if short else next_logits.shape[-1] for d, short in zip(durations, shortened)],
        device=device,
    )
    sampled: list[list[int]] = [[] for _ in range(rows)]
    sum_logprobs = [0.0] * rows
    guard_tripped = [False] * rows
    active = list(range(rows))  # original row index of each row still decoding
    generated = torch.empty(rows, 0, dtype=torch.long, device=device)
    vocabulary = torch.arange(next_logits.shape[-1], device=device)[None, :]
    for step in range(SAMPLE_LEN):
        scores = next_logits.float()
        if any(shortened):  # no timestamp past the real end of the window
            scores = scores.masked_fill(vocabulary > last_timestamp[active][:, None], float("-inf"))
        for rule in rules:
            rule.apply(scores, generated)
        logprobs = F.log_softmax(scores, dim=-1)
        chosen = scores.argmax(dim=-1)
        for j, row in enumerate(active):
            if samplers[row] is not None:
                probabilities = F.softmax(scores[j] / temperatures[row], dim=-1)
                chosen[j] = torch.multinomial(probabilities, 1, generator=samplers[row])[0]
        chosen_logprobs = logprobs[torch.arange(len(active)), chosen].tolist()
        finished = []
        for j, (row, token, lp) in enumerate(zip(active, chosen.tolist(), chosen_logprobs)):
            sum_logprobs[row] += lp
            if token == tokenizer.eot or windows[row].abandoned():
                finished.append(j)
                continue
            sampled[row].append(token)
            if shortened[row]:
                tail = sampled[row][-2:]
                closing = token >= tokenizer.timestamp_begin and len(tail) == 2 and tail[0] < tokenizer.eot
                if closing and (token - tokenizer.timestamp_begin) * precision >= durations[row] - END_GUARD_SECONDS:
                    finished.append(j)
                elif len(sampled[row]) >= budgets[row] or tail_repeats(sampled[row], tokenizer.eot):
                    guard_tripped[row] = True  # stop now rather than loop to the budget: it is re-decoded
                    finished.append(j)
        generated = torch.cat([generated, chosen[:, None]], dim=1)
        if finished:
            done = set(finished)
            keep = [j for j in range(len(active)) if j not in done]
            if not keep:
                break
            keep_index = torch.tensor(keep, device=device)
            cache.keep(keep)
            generated, chosen = generated[keep_index], chosen[keep_index]
            active = [active[j] for j in keep]
        if step == SAMPLE_LEN - 1:
            break
        next_logits = logits(model, decoder_hidden(model, chosen[:, None], cache, torch.ones_like(cache.lengths)))[:, 0]

    outputs = []
    for row, w in enumerate(windows):
        text = tokenizer.decode([t for t in sampled[row] if t < tokenizer.eot])
        outputs.append(
            WindowOutput(
                tokens=sampled[row],
                text=text,
                language=languages[row] or "en",
                temperature=w.temperature,
                avg_logprob=sum_logprobs[row] / (len(sampled[row]) + 1),
                no_speech_prob=float(no_speech[row]),
                compression_ratio=get_compression_ratio(text) if text else 0.0,
                guard_tripped=guard_tripped[row],
            )
        )
    stats = BatchStats(rows, contexts, frames, [len(s) + 1 for s in sampled])
    return outputs, stats


def tail_repeats(tokens: list[int], eot: int, times: int = 3) -> bool:
    """The text tokens end in a phrase of 2–15 tokens said `times` times in a row: a loop,
    detected as it forms (timestamps between the repeats are ignored)."""
    text = [t for t in tokens[-100:] if t < eot]
    for n in range(2, 16):
        if len(text) >= times * n and all(text[-n:] == text[len(text) - (k + 1) * n : len(text) - k * n] for k in range(1, times)):
            return True
    return False


def split_segments(
    tokens: list[int], tokenizer: Tokenizer, duration: float
) -> tuple[list[tuple[float, float, list[int]]], float]:
    """openai-whisper's reading of a window's sampled tokens: (start, end, tokens) per segment,
    in seconds from the window's start, and how many seconds of the window they account for.

    Segments are the spans between consecutive timestamp tokens. When the output ends with a
    single timestamp, the whole window is done; otherwise the unfinished last segment is
    dropped and the window is done only up to the last timestamp (the caller decodes the rest
    again, as `transcribe()` does). Without any timestamp pair the window is one segment.
    """
    precision = CHUNK_LENGTH / 1500  # 0.02 s per timestamp token
    is_time = [t >= tokenizer.timestamp_begin for t in tokens]
    single_ending = is_time[-2:] == [False, True]
    slices = [i + 1 for i in range(len(tokens) - 1) if is_time[i] and is_time[i + 1]]
    if not slices:
        times = [t for t, ts in zip(tokens, is_time) if ts]
        end = (times[-1] - tokenizer.timestamp_begin) * precision if times and times[-1] != tokenizer.timestamp_begin else duration
        return [(0.0, end, tokens)], duration
    if single_ending:
        slices.append(len(tokens))
    segments, last = [], 0
    for current in slices:
        piece = tokens[last:current]
        start, end = ((piece[i] - tokenizer.timestamp_begin) * precision for i in (0, -1))
        segments.append((start, end, piece))
        last = current
    done = duration if single_ending else (tokens[last - 1] - tokenizer.timestamp_begin) * precision
    return segments, done
