"""Tiny demo-task models built once per test session in a temp dir (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from rlhf.config import load_config
from rlhf.data import demo_task
from rlhf.stages import pretrain, sft

hf_logging.disable_progress_bar()

TINY = [
    "pretrain.vocab_size=320",
    "pretrain.arch.hidden_size=48",
    "pretrain.arch.intermediate_size=96",
    "pretrain.arch.num_hidden_layers=2",
    "pretrain.arch.num_attention_heads=4",
    "pretrain.arch.num_key_value_heads=4",
    "pretrain.arch.max_position_embeddings=128",
    "pretrain.block_size=64",
    "pretrain.batch_size=16",
    "pretrain.micro_batch_size=16",
    "pretrain.lr=3e-3",
    "pretrain.warmup_steps=5",
    "pretrain.precision=fp32",
    "pretrain.eval_every=1000",
    "pretrain.save_every=1000",
    "sft.batch_size=16",
    "sft.micro_batch_size=8",
    "sft.max_seq_len=64",
    "sft.lr=2e-3",
    "sft.warmup_steps=2",
    "sft.epochs=2",
    "sft.precision=fp32",
    "sft.eval_every=1000",
    "sft.save_every=1000",
]


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo data, a tiny pretrained model and a tiny SFT model: {'data', 'pretrain', 'sft'} directories."""
    root = tmp_path_factory.mktemp("tiny_demo")
    data = root / "data"
    demo_task.generate(data, seed=0, n_pretrain=3000, n_sft=600, n_rl_prompts=64, n_eval_prompts=64)
    cfg = load_config(
        None,
        [
            *TINY,
            f"pretrain.train_file={data / 'pretrain.txt'}",
            f"pretrain.out_dir={root / 'pretrain'}",
            f"sft.model={root / 'pretrain' / 'final'}",
            f"sft.train_file={data / 'sft.jsonl'}",
            f"sft.out_dir={root / 'sft'}",
        ],
    )
    pretrain.run(cfg.pretrain, quiet=True)
    sft.run(cfg.sft, quiet=True)
    return {
        "data": data,
        "pretrain": root / "pretrain" / "final",
        "sft": root / "sft" / "final",
        "root": root,
    }
