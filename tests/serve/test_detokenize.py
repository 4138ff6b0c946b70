"""Incremental detokenization gives, after every token, exactly the text that decoding the whole list gives."""

from __future__ import annotations

import random

import pytest
from transformers import PreTrainedTokenizerBase

from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.serve.detokenize import IncrementalText, decode

# multi-byte characters (accents: 2 bytes, CJK: 3, emoji: 4, one with a joiner) that BPE merges and splits
TEXTS = [
    "Café crème brûlée, naïve façade. Ça va très bien.",
    "Straße, Ærøskøbing, ¿qué tal? ¡Olé!",
    "Emoji 🙂 and 👍🏽 and 👩‍💻 at work 🎉🎉",
    "日本語のテキスト, 中文文本, 한국어 텍스트",
    "User: hello there\nAssistant: 2 + 2 = 4 ✓",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return train_bpe_tokenizer(TEXTS * 20, vocab_size=400)


def random_ids(tok: PreTrainedTokenizerBase, rng: random.Random, n: int) -> list[int]:
    """Pieces of the texts' encodings (characters split across tokens) mixed with any token of the vocabulary,
    the special ones included, so lone bytes of unfinished characters occur too."""
    encoded = [tok.encode(t) for t in TEXTS]
    ids: list[int] = []
    while len(ids) < n:
        if rng.random() < 0.6:
            source = rng.choice(encoded)
            start = rng.randrange(len(source))
            ids.extend(source[start : start + rng.randint(1, 6)])
        else:
            ids.append(rng.randrange(len(tok)))
    return ids[:n]


def test_the_incremental_text_is_the_whole_lists_after_every_token(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    rng = random.Random(0)
    specials = set(tokenizer.all_special_ids)
    saw_special = saw_partial = False
    for _ in range(200):
        ids = random_ids(tokenizer, rng, 60)
        text = IncrementalText()
        for k in range(1, len(ids) + 1):
            assert text.update(tokenizer, ids[:k]) == decode(tokenizer, ids[:k]), ids[:k]
            saw_partial |= text.text.endswith("\ufffd")
        saw_special |= bool(specials & set(ids))
    assert saw_special and saw_partial  # the sequences did exercise skipped tokens and unfinished characters


def test_each_step_decodes_only_the_last_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(" ".join(TEXTS) * 8)
    text = IncrementalText()
    for k in range(1, len(ids) + 1):
        text.update(tokenizer, ids[:k])
        assert k - text.prefix_offset <= 12  # the window, not the whole list
    assert text.text == decode(tokenizer, ids)


def test_text_unchanged_before_kept_and_read_offset(tokenizer: PreTrainedTokenizerBase) -> None:
    rng = random.Random(1)
    ids = random_ids(tokenizer, rng, 200)
    text = IncrementalText()
    before = ""
    for k in range(1, len(ids) + 1):
        after = text.update(tokenizer, ids[:k])
        assert after[: text.kept] == before[: text.kept]
        assert decode(tokenizer, ids[: text.read_offset]) == text.read_text == after[: len(text.read_text)]
        before = after


def test_a_decoder_that_rewrites_across_tokens_still_gives_the_whole_lists_text(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer.clean_up_tokenization_spaces = True  # " ." becomes "." once the "." arrives
    try:
        ids = tokenizer.encode("a , b . c n't d 's e ! f ?")
        text = IncrementalText()
        for k in range(1, len(ids) + 1):
            assert text.update(tokenizer, ids[:k]) == decode(tokenizer, ids[:k])
    finally:
        tokenizer.clean_up_tokenization_spaces = False
