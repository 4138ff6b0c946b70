"""Train a byte-level BPE tokenizer on a corpus, with a PAD token distinct from EOS and a chat template."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"

# Renders messages in the demo task's dialogue format ("User: ...\nAssistant: ..."), so chat-format data and
# plain prompts give the same text. The assistant's answer follows "Assistant:" after one space, then EOS.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ 'System: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- else -%}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on `texts`; EOS, PAD and UNK are special tokens 0, 1, 2."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=None,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
