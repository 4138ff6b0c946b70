"""The tokenizer's own special-token and chat-template behaviour, in one place for every stage.

- BOS: prompts (and pretraining documents) get the special tokens the tokenizer puts before a text (BOS for
  Llama, Gemma, Mistral; nothing for GPT-2, Qwen) exactly once, even when a chat template already wrote BOS
  as text; responses are tokenized without special tokens, so prompt + response holds BOS once, at the front.
- Chat: conversations are rendered with the model's chat template; an assistant turn ends with the template's
  end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, or EOS), and generation stops at it as well
  as at EOS. A tokenizer without a template gets DEFAULT_CHAT_TEMPLATE ("User: ...\\nAssistant: ..." with EOS
  closing the assistant's turn, the demo task's dialogue format), said in one log line.
- PAD: a tokenizer without PAD, or whose PAD is EOS (GPT-2, Llama 3, Pythia), gets a new `<|pad|>` token;
  `fit_model_to_tokenizer` grows the model's embeddings to hold it. Lengths are carried by attention masks, so
  the new row is never attended to, never a label, and never sampled (a PAD drawn is drawn again without it).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.errors import RlhfError
from rlhf.models.tokenizer import CHAT_TEMPLATE, PAD

log = logging.getLogger(__name__)

DEFAULT_CHAT_TEMPLATE = CHAT_TEMPLATE

# An assistant reply that no tokenizer splits into special tokens, to find what a template writes after one.
_PROBE_REPLY = "Probe reply."


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, add_pad_token: bool = True
) -> PreTrainedTokenizerBase:
    """Check EOS, add a PAD distinct from EOS when missing (unless `add_pad_token` is off), and give a
    template-less tokenizer DEFAULT_CHAT_TEMPLATE (after BOS where it adds one). Changes `tokenizer` in place and
    returns it."""
    name = tokenizer.name_or_path
    if tokenizer.eos_token_id is None:
        raise RlhfError(f"tokenizer {name!r} has no EOS token")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or pad == eos:
        problem = "has no PAD token" if pad is None else f"uses EOS (id {eos}) as PAD"
        if not add_pad_token:
            raise RlhfError(
                f"tokenizer {name!r} {problem}; the reward is read at EOS, so PAD must be a different token: "
                "set add_pad_token: true in this stage's section (--set STAGE.add_pad_token=true, e.g. "
                "generate.add_pad_token) to add one, or save a tokenizer with its own PAD"
            )
        tokenizer.add_special_tokens({"pad_token": PAD})
        log.info("tokenizer %r %s: added PAD %r (id %d)", name, problem, PAD, tokenizer.pad_token_id)
    if not tokenizer.chat_template:
        # The template writes the BOS the tokenizer adds, as Llama's and Mistral's do: tools that tokenize a
        # rendered chat without special tokens (apply_chat_template(tokenize=True), pipelines, vLLM) then see it too.
        bos = "{{ bos_token }}" if special_prefix(tokenizer) == [tokenizer.bos_token_id] else ""
        tokenizer.chat_template = bos + DEFAULT_CHAT_TEMPLATE
        log.info(
            "tokenizer %r has no chat template: using the default 'User: ...\\nAssistant: ...<EOS>' one", name
        )
    return tokenizer


def fit_model_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Grow the embeddings (and a separate output matrix) to hold every token id, e.g. an added PAD, and set
    the config's special ids: PAD, and the stop ids among the generation config's EOS ids. Existing rows are
    untouched, so the logits of existing tokens stay the same."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # New rows start at the mean of the old ones (a tame logit, and no random draw: seeded runs stay the same).
        with torch.random.fork_rng(devices=[]):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        output = model.get_output_embeddings()
        weights = {id(w): w for w in (model.get_input_embeddings().weight, getattr(output, "weight", None))}
        with torch.no_grad():
            for weight in weights.values():
                if weight is not None:
                    weight[rows:] = weight[:rows].mean(0)
            bias = getattr(output, "bias", None)
            if bias is not None:
                bias[rows:] = bias[:rows].mean()
        log.info(
            "model embeddings grown from %d to %d rows for the tokenizer's added tokens", rows, len(tokenizer)
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
        if rows > len(
            tokenizer
        ):  # rows past the tokenizer's last id (Qwen2.5, Phi-3): no text, never sampled
            unused = range(len(tokenizer), rows)
            generation_config.suppress_tokens = sorted({*(generation_config.suppress_tokens or ()), *unused})
        # transformers' generate() (and pipelines) then stop where ours does: at EOS and the end-of-turn token
        eos = generation_config.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        ids += [t for t in stop_ids(tokenizer) if t not in ids]
        generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    return model


# What a tokenizer's rules come to, worked out once per tokenizer (and again if its template changes): stages
# ask per batch or per preference group, and each answer costs a template rendering or two tokenizations.
_RULES: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[str, tuple[Any, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _cached(kind: str, tokenizer: PreTrainedTokenizerBase, compute: Callable[[], Any]) -> Any:
    key = (tokenizer.chat_template, len(tokenizer))
    rules = _RULES.setdefault(tokenizer, {})
    if kind not in rules or rules[kind][0] != key:
        rules[kind] = (key, compute())
    return rules[kind][1]


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before any text (BOS for Llama-style tokenizers, [] for GPT-2 or Qwen)."""
    return list(_cached("prefix", tokenizer, lambda: _special_prefix(tokenizer)))


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], plain_text: bool = False
) -> list[list[int]]:
    """Token ids of texts that start a sequence (prompts, documents): the tokenizer's leading special tokens
    once (not twice when the text, e.g. a rendered chat template, already starts with BOS), none at the end.
    `plain_text`: the texts hold no markup (a corpus's documents): a special token's text in them ("<|pad|>",
    "<|endoftext|>") is text, not that token, which a rendered chat template needs it to be."""
    if not texts:
        return []
    prefix = special_prefix(tokenizer)
    ids = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=plain_text)["input_ids"]
    return [list(s) if prefix and s[: len(prefix)] == prefix else prefix + list(s) for s in ids]


def encode_responses(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of texts that continue a prompt: no special tokens added."""
    if not texts:
        return []
    return [list(s) for s in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template closes an assistant turn with: the first special token it writes after the
    reply (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma), else EOS."""
    return int(_cached("end_of_turn", tokenizer, lambda: _end_of_turn_id(tokenizer)))


def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if not tokenizer.chat_template:
        return int(tokenizer.eos_token_id)
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = str(tokenizer.apply_chat_template(turns, tokenize=False))
    except Exception:  # a template that refuses this conversation tells nothing: EOS closes the turn
        return int(tokenizer.eos_token_id)
    at = text.rfind(_PROBE_REPLY)
    tail = text[at + len(_PROBE_REPLY) :] if at >= 0 else ""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    special -= {tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id}
    for token in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token in special:
            return int(token)
    return int(tokenizer.eos_token_id)


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a response: EOS, and the chat template's end-of-turn token when it is another."""
    eos, eot = int(tokenizer.eos_token_id), end_of_turn_id(tokenizer)
    return [eos] if eot == eos else [eos, eot]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    """The conversation so far as the template renders it, with the generation prompt for the assistant."""
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def chat_demonstration(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[dict[str, Any]], reply: list[dict[str, Any]]
) -> tuple[str, str]:
    """(prompt, response) texts of a conversation and the reply that follows it (ending with the assistant's
    turn), as the template renders them: the prompt with the generation prompt, the response up to and
    including the reply's last end-of-turn token (what follows it, such as a newline, belongs to no turn).
    ValueError when the template renders the history differently once the reply follows (no clean cut)."""
    prompt = chat_prompt(tokenizer, prompt_messages)
    full = str(tokenizer.apply_chat_template(prompt_messages + reply, tokenize=False))
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation differently once the answer follows")
    response = full[len(prompt) :]
    end = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
    at = response.rfind(end)
    return prompt, response[: at + len(end)] if at >= 0 else response


def end_response(ids: list[int], stops: Sequence[int]) -> list[int]:
    """A response's ids ending with a stop token: `stops[0]` (EOS) appended unless the text ended its turn."""
    return ids if ids and ids[-1] in stops else [*ids, stops[0]]


def encode_completions(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Ids of completions that end a sequence, each ending with a stop id: a completion whose text ends with a
    stop token (as a chat template renders a turn, maybe with a newline after it) keeps it, others get EOS."""
    stops = stop_ids(tokenizer)
    ends = tuple(str(t) for t in tokenizer.convert_ids_to_tokens(stops))
    texts = [t.rstrip() if t.rstrip().endswith(ends) else t for t in texts]
    return [end_response(ids, stops) for ids in encode_responses(tokenizer, texts)]


def mask_pad(logits: torch.Tensor, pad_id: int | None, stops: Sequence[int]) -> torch.Tensor:
    """Logits (B, V) with PAD at -inf, so it is never sampled (unless PAD also ends a response)."""
    if pad_id is None or pad_id in stops or pad_id >= logits.size(-1):
        return logits
    return logits.index_fill(-1, torch.tensor([pad_id], device=logits.device), float("-inf"))
