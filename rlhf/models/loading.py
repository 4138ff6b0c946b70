"""Load and save Hugging Face causal LMs and tokenizers (local directory or hub id), or build a new model."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.config import ArchConfig
from rlhf.data.jsonl import give_open_modes
from rlhf.errors import RlhfError
from rlhf.models.tokens import fit_model_to_tokenizer, prepare_tokenizer

log = logging.getLogger(__name__)


# Architectures with a head other than a language model's (reward models, critics, classifiers).
SCALAR_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
# Files one of which a saved tokenizer has (fast, sentencepiece, BPE, WordPiece layouts).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def describe_source(name_or_path: str) -> str:
    """How a model or tokenizer source is named in errors; a path that does not exist is an error of its own
    (a hub id is `name` or `org/name`: anything with more slashes, or starting with / . ~, or whose first part
    is a local folder, as `runs/sft` beside a `runs/` folder, is a path)."""
    restore_replaced(Path(name_or_path).expanduser())
    if Path(name_or_path).expanduser().is_file():  # a checkpoint file, a config, ... given for its folder
        raise RlhfError(f"{name_or_path}: a file, not a model directory")
    if Path(name_or_path).expanduser().exists():
        return f"local directory {name_or_path!r}"
    first = name_or_path.split("/", 1)[0]
    if (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
            or ("/" in name_or_path and Path(first).is_dir())):  # fmt: skip
        raise RlhfError(f"{name_or_path}: no such directory")
    return f"hub id {name_or_path!r}"


def load_tokenizer(name_or_path: str, add_pad_token: bool = True) -> PreTrainedTokenizerBase:
    """AutoTokenizer from a local dir or hub id, checked for EOS, with a PAD distinct from EOS (added when
    missing unless `add_pad_token` is off) and a chat template (see rlhf.models.tokens)."""
    where = describe_source(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        raise RlhfError(
            f"{name_or_path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}) in this directory"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        # its message in one line, whole: the first line of some ends on a colon, before what is missing
        raise RlhfError(f"cannot load tokenizer from {where}: {' '.join(str(e).split())}") from None
    return prepare_tokenizer(tokenizer, add_pad_token)


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """AutoModelForCausalLM from a local dir or hub id (weights kept in `dtype`, fp32 by default); with the
    tokenizer it will read, its embeddings grown to hold the tokenizer's added tokens (an added PAD)."""
    where = describe_source(name_or_path)
    local = Path(name_or_path)
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        raise RlhfError(
            f"{name_or_path} holds LoRA adapters, not a whole model: point at the run's final/ (the adapters "
            "merged into the model), or serve it as it is with `rlhf serve`, which merges them onto their base"
        )
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise RlhfError(f"cannot load model from {where}: {str(e).splitlines()[0]}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and all(a.endswith(SCALAR_HEADS) for a in architectures):  # its LM head would be random
        raise RlhfError(
            f"{name_or_path} is a reward model or critic ({', '.join(architectures)}), not a causal LM: point at "
            "a policy (a pretrained, SFT, DPO or PPO checkpoint)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype)
    except (
        OSError,
        ValueError,
        SafetensorError,
    ) as e:  # SafetensorError: a weights file cut short or damaged
        raise RlhfError(f"cannot load model from {where}: {str(e).splitlines()[0]}") from None
    return fit_model_to_tokenizer(model, tokenizer) if tokenizer is not None else model


def check_same_tokenizer(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, what_a: str, what_b: str
) -> None:
    """Raise unless two models' tokenizers agree token for token (vocabulary and the special tokens the stages
    place: EOS, PAD, BOS): where two models meet (a policy and its reward model or critic), ids from one are
    read by the other. UNK is left out: it only names what text some tokenizer class maps unknown characters
    to (Qwen2's class sets it, the generic one of the same files does not), never an id one model hands another."""
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(a, name) != getattr(b, name):
            raise RlhfError(
                f"{what_a} and {what_b} use different tokenizers: {name} {getattr(a, name)} vs {getattr(b, name)}"
            )
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        if len(va) != len(vb):
            why = f"vocabulary sizes {len(va)} vs {len(vb)}"
        else:
            token = next(t for t in sorted(va) if vb.get(t) != va[t])
            why = f"token {token!r} is id {va[token]} vs {vb.get(token)}"
        raise RlhfError(f"{what_a} and {what_b} use different tokenizers: {why}")


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


def _dropout_rate(name: str, value: Any) -> bool:
    """Whether an attribute holds a dropout probability (attention_dropout, resid_pdrop, layerdrop, ...)."""
    return isinstance(value, float) and ("dropout" in name or name.endswith("pdrop") or name == "layerdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: RLHF's log-prob ratios and reward reads must be deterministic. Besides the
    Dropout modules, the rates many layers copy from their config when built and read in their forward (OPT's
    `dropout`, Llama's `attention_dropout`, OPT's `layerdrop`), and the config's own, for what is built later."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if _dropout_rate(name, value):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if _dropout_rate(key, value):
                setattr(config, key, 0.0)


def save_model_files(model: Any, path: str | Path, state_dict: dict[str, Any] | None = None) -> None:
    """A checkpoint's model files (safetensors): the whole model, or a LoRA model's adapters (and the heads it
    trains) alone. peft would add the whole embedding matrix wherever it was grown for an added PAD; it stays
    frozen, and loading the base model with the same tokenizer grows it the same way, so it is left out.
    `state_dict`: a sharded model's weights, gathered."""
    lora = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
    model.save_pretrained(str(path), safe_serialization=True, state_dict=state_dict, **lora)


def save_pretrained_atomic(
    path: str | Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """save_pretrained (safetensors) into a temp dir beside `path`, then rename: readers never see half a model.
    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        give_open_modes(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def restore_replaced(path: Path) -> None:
    """Put back the directory `replace_dir` had moved aside when the process stopped between its two renames
    (`path` gone, `.NAME.old` beside it), so that what was there is read rather than reported missing."""
    old = path.with_name(f".{path.name}.old")
    if path.name and not path.exists() and old.is_dir():
        old.rename(path)
        log.warning(
            "%s: put back from %s, left there by a process that stopped while replacing it", path, old.name
        )


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing what was there with two renames (a process stopped
    between them leaves `dst` at `.NAME.old`, which `restore_replaced` puts back)."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)
