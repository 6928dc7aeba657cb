"""What a "word" is for TinyBERT augmentation.

TinyBERT's reference implementation splits a sentence into words with BERT's basic tokenizer:
split on whitespace, and every punctuation character (ASCII symbols included) and every CJK
character is a word of its own. We do the same, but keep each word's character span in the
original text, so that an augmented copy is the original text with some spans replaced and
everything else (case, spacing, punctuation) untouched.

A word is *eligible* for replacement when it is made of ASCII letters only (the reference's
``_is_valid``), is at least two letters long, and, unless disabled, is not one of the
reference's stop words. Punctuation, numbers and mixed tokens are never replaced. The length
rule departs from the reference on purpose: single letters are mostly pieces of contractions
(the ``n`` of SST-2's ``n't`` is not a stop word, so the reference replaces it).
"""

from __future__ import annotations

import regex

# BERT's _is_punctuation: Unicode category P*, plus every non-alphanumeric ASCII character.
_PUNCT = r"\p{P}\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e"
# BERT's _is_chinese_char ranges.
_CJK = (
    r"\u4E00-\u9FFF\u3400-\u4DBF\U00020000-\U0002A6DF\U0002A700-\U0002B73F"
    r"\U0002B740-\U0002B81F\U0002B820-\U0002CEAF\uF900-\uFAFF\U0002F800-\U0002FA1F"
)
_WORD_RE = regex.compile(rf"[^\s\p{{Cc}}\p{{Cf}}{_PUNCT}{_CJK}]+|[{_PUNCT}{_CJK}]")
_VALID_RE = regex.compile(r"[A-Za-z]+")

# The stop-word list of TinyBERT's data_augmentation.py (NLTK's English list plus "'s", "'re").
STOP_WORDS: frozenset[str] = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
    yourselves he him his himself she she's her hers herself it it's its itself they them their
    theirs themselves this that that'll these those am is are was were be been being have has had
    having do does did doing a an the and but if or because as until while of at by for with about
    against between into through during before after above below to from up down in out on off
    over under again further then once here there all any both each few more most other some such
    no nor not only own same so than too very s t can will just don don't should should've now d
    ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
    haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
    shouldn't wasn wasn't weren weren't won won't wouldn wouldn't 's 're""".split()
)


def split_words(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the words of ``text`` (BERT basic-tokenizer rules)."""
    return [m.span() for m in _WORD_RE.finditer(text)]


def is_valid_word(word: str) -> bool:
    """ASCII letters only: the words the reference algorithm may replace, and the only
    replacement candidates we accept."""
    return _VALID_RE.fullmatch(word) is not None


def is_eligible(word: str, skip_stopwords: bool = True) -> bool:
    return len(word) > 1 and is_valid_word(word) and not (skip_stopwords and word.lower() in STOP_WORDS)


def match_case(candidate: str, original: str) -> str:
    """Carry the original word's casing onto a (lower-case) candidate."""
    if len(original) > 1 and original.isupper():
        return candidate.upper()
    if original[:1].isupper():
        return candidate[:1].upper() + candidate[1:]
    return candidate
