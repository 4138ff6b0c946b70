"""Scalar-head models: the reward model and the PPO critic.

Both are the policy's transformer with a linear head giving one number per token, saved as a standard
`AutoModelForSequenceClassification` checkpoint (num_labels=1) that other tools load as it is. The reward is the
head's output at the last real token of each sequence (the EOS), found from the attention mask, so left and
right padding give the same reward. Normalisation constants (shift, scale) live in the checkpoint's config and
are applied whenever we read a reward.
"""

from __future__ import annotations

import math

import torch
from safetensors import SafetensorError
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.errors import RlhfError
from rlhf.models.loading import describe_source
from rlhf.models.tokens import fit_model_to_tokenizer

SHIFT_KEY, SCALE_KEY = "rlhf_reward_shift", "rlhf_reward_scale"


def build_scalar_model(
    init_from: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """A causal-LM checkpoint (e.g. the SFT policy) with a new scalar head, N(0, 1/sqrt(d+1)) as in
    Stiennon et al. 2020 / the OpenAI lm-human-preferences code; no bias (or bias 0 where the head has one).
    With the policy's tokenizer, its embeddings hold the tokenizer's added tokens (an added PAD)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the new head as missing: expected, not news
    try:
        model = AutoModelForSequenceClassification.from_pretrained(init_from, num_labels=1, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as e:
        raise RlhfError(f"cannot build a reward model from {init_from!r}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    head = score_head(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    model.config.problem_type = "regression"
    return fit_model_to_tokenizer(model, tokenizer) if tokenizer is not None else model


def load_reward_model(
    path: str, dtype: torch.dtype = torch.float32, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """A trained reward model: refuses a checkpoint without a scalar head (a causal LM would get a random one).
    With the tokenizer it will read, its embeddings hold the tokenizer's added tokens (an added PAD)."""
    check_reward_model(path)
    return load_scalar_model(path, dtype, tokenizer)


def check_reward_model(path: str) -> None:
    """Refuse, from its config alone (no weights read), a checkpoint that is not a reward model."""
    where = describe_source(path)
    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except (OSError, ValueError) as e:
        raise RlhfError(f"cannot load reward model from {where}: {str(e).splitlines()[0]}") from None
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise RlhfError(
            f"{path} is not a reward model ({', '.join(architectures) or 'no architecture'}): train one with "
            "`rlhf reward`, or point at a sequence-classification checkpoint"
        )


def load_scalar_model(
    path: str, dtype: torch.dtype = torch.float32, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """A saved reward model or critic (with its normalisation constants in the config); with the tokenizer it
    will read, its embeddings grown to hold the tokenizer's added tokens (a PAD added to a tokenizer whose PAD
    was EOS, as in checkpoints saved by other tools)."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    except (
        OSError,
        ValueError,
        SafetensorError,
    ) as e:  # SafetensorError: a weights file cut short or damaged
        raise RlhfError(f"cannot load reward model from {path!r}: {str(e).splitlines()[0]}") from None
    return fit_model_to_tokenizer(model, tokenizer) if tokenizer is not None else model


def score_head(model: PreTrainedModel) -> torch.nn.Linear:
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        raise RlhfError(f"{type(model).__name__} has no linear scalar head ('score' or 'classifier')")
    return head


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


def head_scores(model: PreTrainedModel, hidden: Tensor, normalise: bool = True) -> Tensor:
    """The scalar head on hidden states (..., H) -> (...), in float32; normalised with the stored constants."""
    scores = score_head(model)(hidden).squeeze(-1).float()
    if normalise:
        shift, scale = normalisation(model)
        scores = (scores - shift) / scale
    return scores


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token in each row, (B,), for left or right padding."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=-1)


def normalisation(model: PreTrainedModel) -> tuple[float, float]:
    return float(getattr(model.config, SHIFT_KEY, 0.0)), float(getattr(model.config, SCALE_KEY, 1.0))


def set_normalisation(model: PreTrainedModel, shift: float, scale: float = 1.0) -> None:
    """Store r' = (r - shift) / scale in the config, saved with the checkpoint."""
    if not scale > 0:
        raise ValueError(f"reward scale must be positive, got {scale}")
    setattr(model.config, SHIFT_KEY, float(shift))
    setattr(model.config, SCALE_KEY, float(scale))


def sequence_rewards(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, normalise: bool = True
) -> Tensor:
    """One reward per sequence, (B,), read at its last real token; normalised with the stored constants."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) correct for left padding too
    hidden = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state  # (B, T, H)
    last = hidden[
        torch.arange(hidden.size(0), device=hidden.device), last_token_index(attention_mask)
    ]  # (B, H)
    return head_scores(model, last, normalise)
