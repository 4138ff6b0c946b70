"""Shared fixtures: a tiny demo task and a tiny SFT policy trained on it, built once per test session in a temp dir.

Nothing is downloaded: the tokenizer is a small BPE trained on the tiny corpus, the model a 2-layer Llama of
width 32 fine-tuned for 30 SFT steps (about 2 s on one core). Stages that start from "the SFT checkpoint"
(reward, PPO) take `tiny_sft_model`, a directory that holds the model and its tokenizer.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf.config import ArchConfig, SFTConfig
from rlhf.data import demo_task
from rlhf.models.heads import build_scalar_model, set_normalisation
from rlhf.models.loading import build_causal_lm, load_tokenizer
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.stages import sft
from rlhf.stages.pretrain import read_corpus

# Tiny models run fastest on one thread, and the test machine's 2 cores are shared: two OpenMP threads per
# process, spinning against other processes, made the suite 5x slower. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_ARCH = ArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo task's files (pretrain.txt, sft.jsonl, rl_prompts.jsonl, eval_prompts.jsonl), tiny."""
    out = tmp_path_factory.mktemp("demo_data")
    demo_task.generate(out, seed=0, n_pretrain=400, n_sft=200, n_rl_prompts=64, n_eval_prompts=32)
    return out


@pytest.fixture(scope="session")
def tiny_sft_model(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """A tiny SFT policy: directory with a LlamaForCausalLM and its tokenizer (PAD distinct from EOS)."""
    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = train_bpe_tokenizer(read_corpus(demo_data / "pretrain.txt"), vocab_size=300)
    tokenizer.save_pretrained(root / "base")
    build_causal_lm(TINY_ARCH, load_tokenizer(str(root / "base")), seed=0).save_pretrained(root / "base")
    cfg = SFTConfig(out_dir=str(root / "sft"), model=str(root / "base"), train_file=str(demo_data / "sft.jsonl"),
                    max_seq_len=64, batch_size=16, micro_batch_size=16, lr=3e-3, warmup_steps=0, max_steps=30,
                    epochs=3, precision="fp32", eval_fraction=0.05, save_every=1000, log_every=10)  # fmt: skip
    sft.run(cfg, quiet=True)
    return root / "sft" / "final"


def make_demo_candidates(
    n_prompts: int, k: int = 4, seed: int = 0, wrong: float = 0.3, rude: float = 0.25, ramble: float = 0.3,
    endless: float = 0.15, template_weights: list[float] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Candidate rows (the `rlhf generate` format) with the demo world's answers, written without a model:
    each answer is wrong, rude, rambling or endless (finish_reason "length") with the given probabilities."""
    rng = random.Random(seed)
    rows = []
    for n in range(n_prompts):
        q = demo_task.sample_question(rng)
        completions = []
        for _ in range(k):
            never_ends = rng.random() < endless
            text = demo_task.make_response(q, rng, wrong=rng.random() < wrong, rude=rng.random() < rude,
                                           ramble=rng.random() < ramble, endless=never_ends,
                                           template_weights=template_weights)  # fmt: skip
            completions.append({"text": " " + text, "policy": "synthetic",
                                "finish_reason": "length" if never_ends else "stop"})  # fmt: skip
        rows.append(
            {"prompt": demo_task.render_prompt(q.text), "prompt_id": f"p{n}", "completions": completions}
        )
    return rows


@pytest.fixture(scope="session")
def demo_candidates() -> list[dict[str, Any]]:
    """600 prompts with 4 answers of mixed quality each (3,600 pairs), as `rlhf generate` writes them."""
    return make_demo_candidates(600)


@pytest.fixture(scope="session")
def sft_like_candidates() -> list[dict[str, Any]]:
    """300 prompts with 4 answers each, flawed at the SFT demonstrations' rates (10% wrong, 15% rude, 10%
    rambling, mostly wordy templates, all ending): what the demo SFT policy samples."""
    return make_demo_candidates(300, wrong=0.1, rude=0.15, ramble=0.1, endless=0.0,
                                template_weights=[0.15, 0.35, 0.25, 0.15, 0.1])  # fmt: skip


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory, tiny_sft_model: Path) -> Path:
    """A reward model built from the tiny SFT model: an untrained scalar head, normalised to shift 0, scale 1."""
    path = tmp_path_factory.mktemp("tiny_rm") / "rm"
    model = build_scalar_model(str(tiny_sft_model), seed=0)
    set_normalisation(model, 0.0, 1.0)
    model.save_pretrained(path)
    load_tokenizer(str(tiny_sft_model)).save_pretrained(path)
    return path


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots (gitignored)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright, one per session (two sync Playwrights cannot share a process)."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()
