"""A T5-style SentencePiece tokenizer, built offline for the tiny T5 text encoders.

The real T5 tokenizer is a trained SentencePiece model that cannot be downloaded here, and the
tiny T5 encoders of :mod:`audit.testbed.families` have random weights anyway, so any fixed
vocabulary does. This one is a Unigram model laid out as T5's: ``<pad>`` = 0, ``</s>`` = 1,
``<unk>`` = 2, then pieces; a Metaspace pre-tokenizer marks word starts with "▁", and ``</s>`` is
appended to every sequence. The pieces are every printable ASCII character with and without the
word mark, then a fixed list of common English words and letter pairs; nothing is trained, so
the tokenizer is the same on every machine. Characters outside the vocabulary become ``<unk>``.

The backend is wrapped in ``transformers.T5Tokenizer``, which in transformers 5 is the
``tokenizers``-backed class (``T5TokenizerFast`` is an alias of it). Its ``from_pretrained``
rebuilds the backend from the vocabulary in the saved ``tokenizer.json`` with its own
normalizer-free Unigram / whitespace-split + Metaspace pipeline, so the backend built here has
exactly that shape and a saved-then-loaded tokenizer gives the same ids.
"""

from __future__ import annotations

import string
from functools import lru_cache

SPECIALS = ("<pad>", "</s>", "<unk>")
WORD_MARK = "\u2581"  # "▁", SentencePiece's word-start mark
# Common English words and letter pairs, as whole words (with the word mark) and as word pieces.
WORDS = (
    "the of and to in is it that for on with as was at by an be this are or from a i you he "
    "she we they his her my our their not but all one two red blue green black white small "
    "big old new photo image picture painting drawing of cat dog fox bird man woman tree "
    "house car street sky sea water city art style portrait landscape"
).split()
PAIRS = (
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le "
    "ve co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur ing ion tion"
).split()
# Positions of T5's default SentencePiece model; the pipelines pass their own max lengths.
DEFAULT_MAX_LENGTH = 512


@lru_cache(maxsize=1)
def vocabulary() -> tuple[tuple[str, float], ...]:
    """(piece, log-probability) in id order. Every piece of a kind scores the same, longer kinds
    a little higher, so a word splits into the fewest pieces and ties break the same way."""
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in SPECIALS]
    seen = set(SPECIALS)

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    add(WORD_MARK, -12.0)
    printable = [c for c in string.printable if c.isprintable() and not c.isspace()]
    for char in printable:
        add(WORD_MARK + char, -10.0)
        add(char, -11.0)
    for word in WORDS:
        add(WORD_MARK + word, -8.0)
    for pair in PAIRS:
        add(pair, -9.0)
        add(WORD_MARK + pair, -8.5)
    return tuple(pieces)


def vocab_size() -> int:
    """Number of ids the tokenizer can produce (a T5Config's ``vocab_size`` must be at least this)."""
    return len(vocabulary())


def _backend():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    backend = Tokenizer(Unigram(list(vocabulary()), unk_id=SPECIALS.index("<unk>"), byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=WORD_MARK, prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement=WORD_MARK, prepend_scheme="always", split=True)
    eos = SPECIALS.index("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos)]
    )
    return backend


def t5_tokenizer(model_max_length: int = DEFAULT_MAX_LENGTH):  # -> transformers.T5Tokenizer
    """A ``transformers.T5Tokenizer`` over :func:`vocabulary` (no sentinel ``<extra_id_*>`` tokens)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(
        tokenizer_object=_backend(),
        vocab=list(vocabulary()),
        extra_ids=0,
        additional_special_tokens=[],
        model_max_length=model_max_length,
    )
