"""Load and save Hugging Face causal LMs and tokenizers (local directory or hub id), or build a new model."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.config import ArchConfig
from rlhf.errors import RlhfError
from rlhf.models.tokenizer import check_tokenizer

log = logging.getLogger(__name__)


def _describe(name_or_path: str) -> str:
    return f"local directory {name_or_path!r}" if Path(name_or_path).exists() else f"hub id {name_or_path!r}"


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer from a local dir or hub id, checked for EOS and a distinct PAD."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise RlhfError(
            f"cannot load tokenizer from {_describe(name_or_path)}: {str(e).splitlines()[0]}"
        ) from None
    check_tokenizer(tokenizer)
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """AutoModelForCausalLM from a local dir or hub id (weights kept in `dtype`, fp32 by default)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise RlhfError(
            f"cannot load model from {_describe(name_or_path)}: {str(e).splitlines()[0]}"
        ) from None
    return model


def build_causal_lm(arch: ArchConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A new Llama-style model sized by `arch`, its vocabulary and special ids taken from the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        tie_word_embeddings=arch.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def context_length(model: PreTrainedModel) -> int:
    return int(
        getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 0) or 2048
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: RLHF's log-prob ratios and reward reads must be deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def save_pretrained_atomic(
    path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """save_pretrained (safetensors) into a temp dir beside `path`, then rename: readers never see half a model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing what was there with two renames."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)
