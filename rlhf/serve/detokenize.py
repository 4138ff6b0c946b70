"""Incremental detokenization: the text of a growing list of tokens, updated per token by decoding a short window
of the last tokens instead of the whole list, which would make a long answer's decoding quadratic in its length.

Follows vLLM's `detokenize_incrementally` (vllm/transformers_utils/detokenizer_utils.py): the text of the tokens
before `read_offset` is final; the window decoded at each step starts a few tokens earlier, at `prefix_offset`,
because a decoder may read a list's first token differently (SentencePiece drops its leading space), and the new
text is what the window decodes to past the text of its first, already read, tokens. The read offset only moves
past text that does not end in U+FFFD (part of a UTF-8 character a later token may complete).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The text of `ids` as a choice shows it: special tokens left out."""
    return str(tokenizer.decode(ids, skip_special_tokens=True))


@dataclass
class IncrementalText:
    """Where a sequence's incremental decoding stands: `text` is always `decode(tokenizer, ids)` of the ids last
    passed to `update`."""

    text: str = ""
    kept: int = 0  # characters of the text before the last update that the update left as they were
    read_text: str = ""  # decode(ids[:read_offset]), which later tokens cannot change
    prefix_offset: int = 0
    read_offset: int = 0
    prefix_text: str = ""  # decode(ids[prefix_offset:read_offset])

    def update(self, tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
        """The text of `ids`, which extend the ones passed last; decodes ids[prefix_offset:] only."""
        window = decode(tokenizer, ids[self.prefix_offset :])
        if not window.startswith(self.prefix_text):
            # a decoder that rewrites text across tokens (such as clean_up_tokenization_spaces): decode it all
            # and start again from the first token
            self.text, self.kept = decode(tokenizer, ids), 0
            self.read_text, self.prefix_offset, self.read_offset, self.prefix_text = "", 0, 0, ""
            return self.text
        self.kept = len(self.read_text)
        unread = window[len(self.prefix_text) :]
        self.text = self.read_text + unread
        # an empty `unread` (only special tokens) is not read either: the next window keeps its context
        if unread and not unread.endswith("\ufffd"):
            self.read_text = self.text
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            self.prefix_text = decode(tokenizer, ids[self.prefix_offset : self.read_offset])
        return self.text
