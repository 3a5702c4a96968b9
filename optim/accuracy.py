"""Word and character error rates of one transcript against a reference, after Whisper's text
normalizers: the English one for English text (spelling, numbers, fillers, contractions), the basic
one (case, punctuation, diacritics) for any other language, as in Whisper's paper."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import jiwer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer


@lru_cache
def normalizer(language: str) -> BasicTextNormalizer | EnglishTextNormalizer:
    return EnglishTextNormalizer() if language == "en" else BasicTextNormalizer()


def has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


@dataclass(frozen=True)
class Score:
    word_errors: int  # substitutions + deletions + insertions
    words: int  # reference words
    char_errors: int
    chars: int

    @property
    def wer(self) -> float:
        return self.word_errors / self.words

    @property
    def cer(self) -> float:
        return self.char_errors / self.chars


def score(reference: str, hypothesis: str, language: str) -> Score | None:
    """The errors of `hypothesis` against `reference`, both in `language` (ISO code); None when
    the reference is empty once normalized (an error rate has no denominator then)."""
    normalize = normalizer(language)
    ref, hyp = normalize(reference).strip(), normalize(hypothesis).strip()
    if not has_words(ref):  # the English normalizer keeps a lone "." of "..."
        return None
    if not has_words(hyp):  # jiwer refuses empty strings: everything was deleted
        return Score(len(ref.split()), len(ref.split()), len(ref), len(ref))
    words = jiwer.process_words(ref, hyp)
    chars = jiwer.process_characters(ref, hyp)
    return Score(
        words.substitutions + words.deletions + words.insertions,
        words.substitutions + words.deletions + words.hits,
        chars.substitutions + chars.deletions + chars.insertions,
        chars.substitutions + chars.deletions + chars.hits,
    )


def corpus_wer(references: list[str], hypotheses: list[str], language: str = "en") -> float:
    """Corpus WER (a fraction): word errors summed over all pairs over all reference words, after
    the normalizer of `language`, as the Whisper paper computes it. An empty hypothesis counts
    every reference word as deleted."""
    normalize = normalizer(language)
    return jiwer.wer([normalize(r) for r in references], [normalize(h) or "<empty>" for h in hypotheses])
