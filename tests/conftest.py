"""Shared fixtures: a tiny demo task and tiny models trained on it, built once per test session in a temp dir.

Nothing is downloaded: the tokenizer is a small BPE trained on the tiny corpus, the model a 2-layer Llama of
width 32, fine-tuned for a few SFT steps; the reward model is that model with a new scalar head.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import ArchConfig, SFTConfig
from rlhf.data import demo_task
from rlhf.models.heads import build_scalar_model, set_normalisation
from rlhf.models.loading import build_causal_lm, load_tokenizer
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.train import sft
from rlhf.train.pretrain import read_corpus

TINY_ARCH = ArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo task at a tenth of a percent of its size."""
    out = tmp_path_factory.mktemp("demo_data")
    demo_task.generate(out, seed=0, n_pretrain=400, n_sft=200, n_rl_prompts=64, n_eval_prompts=32)
    return out


@pytest.fixture(scope="session")
def tiny_sft_model(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """A tiny SFT policy (directory with model and tokenizer): BPE + 2-layer Llama + 30 SFT steps."""
    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = train_bpe_tokenizer(read_corpus(demo_data / "pretrain.txt"), vocab_size=300)
    tokenizer.save_pretrained(root / "base")
    build_causal_lm(TINY_ARCH, load_tokenizer(str(root / "base")), seed=0).save_pretrained(root / "base")
    cfg = SFTConfig(out_dir=str(root / "sft"), model=str(root / "base"), train_file=str(demo_data / "sft.jsonl"),
                    max_seq_len=64, batch_size=16, micro_batch_size=16, lr=3e-3, warmup_steps=0, max_steps=30,
                    epochs=3, precision="fp32", eval_fraction=0.05, save_every=1000, log_every=10)  # fmt: skip
    sft.run(cfg, quiet=True)
    return root / "sft" / "final"


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory, tiny_sft_model: Path) -> Path:
    """A reward model built from the tiny SFT model: an untrained scalar head, normalised to shift 0, scale 1."""
    path = tmp_path_factory.mktemp("tiny_rm") / "rm"
    model = build_scalar_model(str(tiny_sft_model), seed=0)
    set_normalisation(model, 0.0, 1.0)
    model.save_pretrained(path)
    load_tokenizer(str(tiny_sft_model)).save_pretrained(path)
    return path
