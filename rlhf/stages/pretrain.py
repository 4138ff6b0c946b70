"""`rlhf pretrain`: next-token prediction on a corpus packed into fixed-length blocks.

Set-up (corpus, tokenizer, model), then the shared LM loop (rlhf.train.lm_loop.fit): AdamW with warm-up and
cosine decay, gradient clipping, bf16 autocast where supported, held-out loss and perplexity, atomic checkpoints.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

from rlhf.config import PretrainConfig
from rlhf.data.sources import DATASET_SUFFIXES, iter_rows, text_field
from rlhf.errors import ConfigError, DataError
from rlhf.models.loading import (
    build_causal_lm,
    context_length,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
)
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.models.tokens import encode_prompts
from rlhf.runs import Run, seed_everything
from rlhf.train.common import make_accelerator
from rlhf.train.lm_loop import Example, fit

log = logging.getLogger(__name__)


def read_corpus(path: str | Path) -> list[str]:
    """Documents of a corpus: a text file's blank-line-separated blocks, or the `text` field of each row of any
    other source of rlhf.data.sources (JSONL, JSON, Parquet, CSV, a saved `datasets` folder, a hub id)."""
    path = Path(path)
    if path.suffix == ".txt" or (path.is_file() and path.suffix not in DATASET_SUFFIXES):
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        docs = text_blocks(path)
    elif text_folder(path):  # a folder of text files: each read as one is, not a document per line
        docs = [d for f in text_folder(path) for d in text_blocks(f)]
    else:
        docs = [text_field(row, "text", where) for where, row in iter_rows(path)]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path}: the corpus is empty")
    return docs


def text_blocks(path: Path) -> list[str]:
    """A text file's documents: its blocks between blank lines (a line of spaces is blank too)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is not text
    except UnicodeDecodeError as e:
        line = path.read_bytes().count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    return [d.strip() for d in re.split(r"\n[^\S\n]*\n", text)]


def text_folder(path: Path) -> list[Path]:
    """The .txt files of a folder that holds text files and no other data files nor a saved `datasets` folder
    (sorted, subfolders included), else []: `datasets`' text loader would make each of their lines a document,
    cutting every document of several lines (code, verse) and putting EOS after each line."""
    if not path.is_dir() or (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return []
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )
    texts = [f for f in files if f.suffix == ".txt"]
    others = [f for f in files if f.suffix in DATASET_SUFFIXES or f.name.endswith((".jsonl.gz", ".json.gz"))]
    return texts if texts and not others else []


def pack(docs: list[list[int]], eos_id: int, block_size: int) -> list[Example]:
    """Concatenate documents, each followed by EOS, and cut the stream into blocks of `block_size` tokens."""
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        stream.append(eos_id)
    blocks = []
    for i in range(0, len(stream) - block_size + 1, block_size):
        block = stream[i : i + block_size]
        blocks.append({"input_ids": block, "labels": list(block)})
    return blocks


def split_docs(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A deterministic held-out split by document."""
    if fraction == 0 or len(docs) < 2:
        return docs, []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(docs) * fraction))
    held = set(order[:n_eval])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def run(cfg: PretrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    accelerator = make_accelerator(cfg.precision, cfg.log_with, cfg.out_dir)
    seed_everything(cfg.seed + accelerator.process_index)
    docs = read_corpus(cfg.train_file)  # read before any output: bad input leaves nothing behind
    if cfg.eval_file:
        train_docs, eval_docs = docs, read_corpus(cfg.eval_file)
    else:
        train_docs, eval_docs = split_docs(docs, cfg.eval_fraction, cfg.seed)
    run_dir = Run(cfg.out_dir, cfg, accelerator.is_main_process, accelerator, resume=resume)
    checkpoint = run_dir.latest_checkpoint() if resume else None

    # Model and tokenizer: a checkpoint to resume, a given model, or new ones (the tokenizer trained here).
    if checkpoint is not None:
        tokenizer = load_tokenizer(str(checkpoint), cfg.add_pad_token)
        model = load_causal_lm(str(checkpoint), tokenizer=tokenizer)
    elif cfg.model:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.add_pad_token)
        model = load_causal_lm(cfg.model, tokenizer=tokenizer)
    else:
        if cfg.tokenizer:
            tokenizer = load_tokenizer(cfg.tokenizer, cfg.add_pad_token)
        else:
            tok_dir = run_dir.dir / "tokenizer"
            if accelerator.is_main_process:
                train_bpe_tokenizer(train_docs, cfg.vocab_size).save_pretrained(tok_dir)
            accelerator.wait_for_everyone()
            tokenizer = load_tokenizer(str(tok_dir), cfg.add_pad_token)
            # a small corpus has fewer merges to make than asked, and the byte alphabet needs 256 at least
            log.info("pretrain: a tokenizer of %d tokens trained on the corpus (pretrain.vocab_size %d)",
                     len(tokenizer), cfg.vocab_size)  # fmt: skip
        model = build_causal_lm(cfg.arch, tokenizer, seed=cfg.seed)
    disable_dropout(model)
    if cfg.block_size > context_length(model):
        raise ConfigError(
            f"pretrain.block_size: {cfg.block_size} exceeds the model's context of {context_length(model)} tokens"
        )

    # each document starts with BOS, if any; a special token's text in a document is text (one that mentions
    # "<|endoftext|>" is not cut there)
    encode = lambda texts: encode_prompts(tokenizer, texts, plain_text=True)  # noqa: E731
    train = pack(encode(train_docs), tokenizer.eos_token_id, cfg.block_size)
    held_out = (
        pack(encode(eval_docs), tokenizer.eos_token_id, cfg.block_size)[: cfg.max_eval_blocks]
        if eval_docs
        else []
    )
    if not train:
        raise DataError(f"{cfg.train_file}: too little text for one block of {cfg.block_size} tokens")
    if eval_docs and not held_out:
        log.warning("pretrain: the %d held-out documents hold too little text for one block of %d tokens: no "
                    "held-out loss (a larger eval_fraction, or an eval_file, gives one)", len(eval_docs),
                    cfg.block_size)  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "pretrain: %d blocks of %d tokens, %d held out, model %.2fM parameters",
        len(train),
        cfg.block_size,
        len(held_out),
        n_params / 1e6,
    )
    return fit(stage="pretrain", model=model, tokenizer=tokenizer, train=train, held_out=held_out, cfg=cfg,
               accelerator=accelerator, run=run_dir, checkpoint=checkpoint, quiet=quiet)  # fmt: skip
