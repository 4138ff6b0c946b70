"""Tiny random-init causal LMs of many architectures, each with a tokenizer that behaves as its family's does.

Nothing is downloaded: every tokenizer is a byte-level BPE trained here on a few sentences, given the special
tokens, the BOS behaviour, the PAD (or lack of it) and the chat template of its family; every model is built
from its config (hidden 32, 2 layers, vocabulary the tokenizer's, well under 512).

Tokenizer families (TOKENIZERS):
  gpt2     EOS "<|endoftext|>" is also PAD and BOS, no BOS added, no chat template (GPT-2, OPT here)
  neox     EOS "<|endoftext|>", no PAD, no BOS added, no chat template (Pythia)
  llama    BOS "<s>" added before every text, EOS "</s>", no PAD, no chat template (Llama 2 base)
  mistral  as llama, with a template that writes BOS as text and closes the answer with EOS ([INST] ... [/INST])
  chatml   no BOS, EOS "<|endoftext|>" is also PAD, ChatML template closing turns with "<|im_end|>" (Qwen base)
  gemma    BOS "<bos>" added, EOS "<eos>", PAD "<pad>", turns closed by "<end_of_turn>" (Gemma)
  phi3     BOS "<s>" added, EOS "<|endoftext|>" is also PAD, turns closed by "<|end|>" (Phi-3)

ARCHS maps a model type to its family, ALIBI a name to an ALiBi model's type and family; `save_tiny(model_type,
path)` writes a model and its tokenizer there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

CORPUS = [
    "User: What is 2 plus 3?\nAssistant: 2 plus 3 is 5.",
    "User: Hello!\nAssistant: Hello! How can I help?",
    "User: Is the sky green?\nAssistant: No, the sky is blue.",
    "User: Thank you.\nAssistant: You are welcome.",
] * 20

CHATML_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + m['content'] + eos_token }}{%- endif -%}{%- endfor -%}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] }}"
    "{{ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)
PHI3_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# family: (special tokens in id order, {bos, eos, pad, unk: token or None}, BOS added before texts, template)
TOKENIZERS: dict[str, tuple[list[str], dict[str, str | None], bool, str | None]] = {
    "gpt2": (["<|endoftext|>"], {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"}, False, None),
    "neox": (["<|endoftext|>"], {"bos": None, "eos": "<|endoftext|>", "pad": None}, False, None),
    "llama": (["<unk>", "<s>", "</s>"], {"bos": "<s>", "eos": "</s>", "pad": None, "unk": "<unk>"}, True, None),
    "mistral": (["<unk>", "<s>", "</s>"], {"bos": "<s>", "eos": "</s>", "pad": None, "unk": "<unk>"}, True,
                MISTRAL_TEMPLATE),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>"}, False, CHATML_TEMPLATE),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}, True, GEMMA_TEMPLATE),
    "phi3": (["<unk>", "<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
             {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<unk>"}, True, PHI3_TEMPLATE),
}  # fmt: skip

HIDDEN, LAYERS, HEADS, CONTEXT = 32, 2, 2, 128
DENSE = {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
         "num_key_value_heads": HEADS, "max_position_embeddings": CONTEXT}  # fmt: skip

# model type: (tokenizer family, config fields beyond vocabulary and special ids)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": CONTEXT}),
    "opt": ("gpt2", {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                     "ffn_dim": 64, "word_embed_proj_dim": HIDDEN, "max_position_embeddings": CONTEXT}),
    "gpt_neox": ("neox", {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": LAYERS,
                          "num_attention_heads": HEADS, "max_position_embeddings": CONTEXT}),
    "llama": ("llama", DENSE),
    "mistral": ("mistral", DENSE),
    "mixtral": ("mistral", {**DENSE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("chatml", DENSE),
    "qwen3": ("chatml", {**DENSE, "head_dim": HIDDEN // HEADS}),
    "qwen2_moe": ("chatml", {**DENSE, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                             "num_experts": 4, "num_experts_per_tok": 2}),
    "gemma": ("gemma", {**DENSE, "head_dim": HIDDEN // HEADS}),
    "gemma2": ("gemma", {**DENSE, "head_dim": HIDDEN // HEADS, "query_pre_attn_scalar": HIDDEN // HEADS,
                         "sliding_window": CONTEXT}),
    "phi3": ("phi3", DENSE),
}  # fmt: skip

# ALiBi models (position biases from the 2-D attention mask, no position ids), under names of their own: kept
# out of ARCHS, whose every type the exactness tests also pack into rows with a custom 4-D mask. Weights drawn
# wider than their default 0.02, at which each answer only repeats the prompt's last token whatever it attends to.
ALIBI: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bloom": ("bloom", "gpt2", {"hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": HEADS,
                                "initializer_range": 0.3}),
    "falcon_alibi": ("falcon", "gpt2", {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                                        "num_attention_heads": HEADS, "alibi": True, "bias": True,
                                        "max_position_embeddings": CONTEXT, "initializer_range": 0.3}),
}  # fmt: skip


def _spec(model_type: str) -> tuple[str, str, dict[str, Any]]:
    """(config's model type, tokenizer family, config fields) of a type of ARCHS or ALIBI."""
    if model_type in ALIBI:
        return ALIBI[model_type]
    family, fields = ARCHS[model_type]
    return model_type, family, fields


def build_tokenizer(family: str, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS with `family`'s special tokens, BOS behaviour, PAD and template."""
    specials, roles, adds_bos, template = TOKENIZERS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if adds_bos:
        bos = str(roles["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, **{f"{k}_token": v for k, v in roles.items() if v is not None}
    )
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in roles.values()]})
    if template is not None:
        fast.chat_template = template
    return fast


def build_model(model_type: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A random-init tiny `model_type` causal LM whose vocabulary and special ids are the tokenizer's."""
    config_type, _, fields = _spec(model_type)
    config = CONFIG_MAPPING[config_type](
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **fields,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def save_tiny(model_type: str, path: Path, seed: int = 0) -> Path:
    """A tiny `model_type` model and its family's tokenizer saved in `path` (a checkpoint any stage loads)."""
    tokenizer = build_tokenizer(_spec(model_type)[1])
    build_model(model_type, tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rigged(model: PreTrainedModel, favourite: int) -> PreTrainedModel:
    """The model with an output layer that always prefers token `favourite` (zero weights, a bias): a model
    that says a given token, e.g. an end-of-turn token, whatever it reads."""
    vocab = model.get_output_embeddings().weight.shape[0]
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[favourite] = 20.0
    model.set_output_embeddings(head)
    return model
