"""A served policy: its model (LoRA adapters merged onto their base), tokenizer, version and engine.

The version is what the feedback store records with every production completion: the model id plus the
first 12 hex digits of a SHA-256 over the checkpoint's config and weight files, so two runs that wrote
different weights under the same path never share a version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.errors import RlhfError
from rlhf.models.loading import context_length, describe_source, load_causal_lm, load_tokenizer
from rlhf.serve.engine import Engine

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"
HASHED_SUFFIXES = (".safetensors", ".bin", ".pt", ".json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Policy:
    name: str  # the model id clients send
    version: str  # name@digest, the lineage written with each A/B completion
    path: str
    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    context_length: int
    created: int = field(default_factory=lambda: int(time.time()))


def load_policy(
    path: str,
    name: str | None,
    dtype: str = "fp32",
    device: str = "auto",
    max_batch_size: int = 32,
    batch_wait_s: float = 0.005,
    max_queue: int = 1024,
    seed: int = 0,
) -> Policy:
    """Load the model at `path` (merging a LoRA adapter onto its base) and start its generation worker."""
    model, tokenizer = load_model(path, DTYPES[dtype])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.nn.Module.to(model, torch.device(device))  # (transformers types `.to` for its own dtype args)
    name = name or default_name(path)
    version = f"{name}@{checkpoint_digest(path)}"
    engine = Engine(model, tokenizer, name, max_batch_size, batch_wait_s, max_queue, seed)
    engine.start()
    log.info("serving %s as %r (version %s)", path, name, version)
    return Policy(name, version, path, tokenizer, engine, context_length(model))


def load_model(path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM ready for inference; a PEFT adapter dir is loaded onto its base and merged into it."""
    adapter_config = Path(path) / ADAPTER_CONFIG
    if not adapter_config.is_file():
        tokenizer = load_tokenizer(path)
        return load_causal_lm(path, dtype, tokenizer=tokenizer).eval(), tokenizer
    from peft import PeftModel

    base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base_path:
        raise RlhfError(
            f"{adapter_config}: no base_model_name_or_path; cannot tell which model to merge onto"
        )
    try:
        describe_source(base_path)  # a path that is not there (a hub id passes)
    except RlhfError:
        raise RlhfError(
            f"{adapter_config}: base_model_name_or_path {base_path!r} is not a directory from here (the adapter "
            "names its base model as it was given at training, relative to where that ran): run from there, or "
            "set it to the base model's path"
        ) from None
    has_tokenizer = any((Path(path) / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(path if has_tokenizer else base_path)
    base = load_causal_lm(base_path, dtype, tokenizer=tokenizer)
    # Merging once makes serving as fast as the base model: no adapter matmuls per token.
    model = PeftModel.from_pretrained(base, path).merge_and_unload()
    return model.eval(), tokenizer


def default_name(path: str) -> str:
    """The last two parts of a local path ("sft/final"), or a hub id as given."""
    local = Path(path)
    if not local.exists():
        return path
    return "/".join(local.resolve().parts[-2:])


def checkpoint_digest(path: str) -> str:
    """12 hex digits of SHA-256 over the checkpoint's config and weight files (name and bytes, sorted).

    A hub id, with nothing local to hash, is its own digest input.
    """
    h = hashlib.sha256()
    local = Path(path)
    files = sorted(p for p in local.iterdir() if p.suffix in HASHED_SUFFIXES) if local.is_dir() else []
    if not files:
        h.update(path.encode())
    for file in files:
        h.update(file.name.encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]
