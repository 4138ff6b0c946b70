"""Stages on stock-like tokenizers (tests/archs.py): SFT on a ChatML model whose PAD is EOS saves a checkpoint
with its own PAD and learns the template's turns; generate and serve stop at the end-of-turn token; serve starts
on a model whose PAD is EOS."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.config import GenerateConfig, PPOConfig, SFTConfig
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.serve.engine import Engine
from rlhf.serve.sequence import RowParams, Sequence
from rlhf.serve.settings import Settings
from rlhf.stages import generate, ppo, sft
from tests.archs import rigged, save_tiny
from tests.serve.conftest import run_server
from tests.serve.test_engine import Collector

TURNS = [
    ("Hello!", "Hello! How can I help?"),
    ("Thank you.", "You are welcome."),
    ("Is the sky green?", "No."),
]


def test_sft_on_a_chatml_model_whose_pad_is_eos(tmp_path: Path) -> None:
    model_dir = save_tiny("qwen2", tmp_path / "qwen2")
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in TURNS * 6
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig(out_dir=str(tmp_path / "sft"), model=str(model_dir), train_file=str(tmp_path / "chat.jsonl"),
                    max_seq_len=64, batch_size=8, micro_batch_size=8, max_steps=2, warmup_steps=0, precision="fp32",
                    eval_fraction=0.2, save_every=1000, log_every=1)  # fmt: skip
    sft.run(cfg, quiet=True)
    final = tmp_path / "sft" / "final"
    saved = AutoTokenizer.from_pretrained(final)  # as any tool reads it, without this package's fixes
    assert saved.pad_token == "<|pad|>" and saved.pad_token_id not in (None, saved.eos_token_id)
    assert "<|im_start|>" in saved.chat_template  # the model's own template, kept
    model = load_causal_lm(str(final))
    assert model.get_input_embeddings().weight.shape[0] == len(saved)
    assert model.config.pad_token_id == saved.pad_token_id
    samples = [json.loads(line) for line in (tmp_path / "sft" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].endswith("<|im_start|>assistant\n") for s in samples)


def test_generate_stops_at_the_end_of_turn_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = save_tiny("qwen2", tmp_path / "qwen2")
    tok = load_tokenizer(str(model_dir))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    monkeypatch.setattr(
        generate,
        "load_causal_lm",
        lambda path, tokenizer: rigged(load_causal_lm(path, tokenizer=tokenizer), im_end),
    )
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"}) + "\n"
    )
    cfg = GenerateConfig(model=str(model_dir), prompts_file=str(tmp_path / "prompts.jsonl"),
                         out=str(tmp_path / "out.jsonl"), k=2, max_new_tokens=6, precision="fp32")  # fmt: skip
    generate.run(cfg)
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(c["text"], c["finish_reason"]) for c in row["completions"]] == [("", "stop")] * 2


def test_serve_engine_stops_at_the_end_of_turn_token_and_never_samples_pad(tmp_path: Path) -> None:
    model_dir = save_tiny("qwen2", tmp_path / "qwen2")
    tok = load_tokenizer(str(model_dir))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    engine = Engine(rigged(load_causal_lm(str(model_dir), tokenizer=tok), im_end), tok, "t", batch_wait_s=0.0)
    engine.start()
    try:
        got = Collector(1)
        engine.submit([Sequence(tok("Hi")["input_ids"], RowParams(max_tokens=6, temperature=0), 0, got.emit)])
        got.wait()
    finally:
        engine.stop()
    assert got.text(0) == "" and got.deltas[0][-1].finish_reason == "stop"
    # logits that favour PAD: greedy and sampled rows both take another token
    logits = torch.zeros(2, len(tok))
    logits[:, tok.pad_token_id] = 20.0
    rows = [
        Sequence([1], RowParams(max_tokens=4, temperature=t), i, got.emit) for i, t in enumerate((0.0, 1.0))
    ]
    assert tok.pad_token_id not in engine._sample(logits, rows).tolist()


def test_serve_starts_on_a_model_whose_pad_is_eos(tmp_path: Path) -> None:
    model_dir = save_tiny("gpt2", tmp_path / "gpt2")
    assert (
        AutoTokenizer.from_pretrained(model_dir).pad_token_id
        == AutoTokenizer.from_pretrained(model_dir).eos_token_id
    )
    with run_server(Settings(model_dir=str(model_dir), model_name="gpt2", ab_rate=0.0)) as (url, app):
        assert app.state.serve.main.tokenizer.pad_token == "<|pad|>"
        messages = [{"role": "user", "content": "Hello!"}]
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt2", "messages": messages, "max_tokens": 4},
                       timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_ppo_takes_a_reward_model_saved_by_transformers_whose_pad_is_eos(tmp_path: Path) -> None:
    """A sequence classifier saved by plain transformers with the stock tokenizer (PAD = EOS): PPO's tokenizer adds
    a PAD, so the reward model and the critic built from it must hold that id too."""
    model_dir = save_tiny("qwen2", tmp_path / "qwen2")
    stock = AutoTokenizer.from_pretrained(model_dir)
    assert stock.pad_token_id == stock.eos_token_id
    AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(
        tmp_path / "rm"
    )
    stock.save_pretrained(tmp_path / "rm")
    rows = [{"messages": [{"role": "user", "content": q}]} for q, _ in TURNS * 2]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PPOConfig(out_dir=str(tmp_path / "ppo"), policy=str(model_dir), reward_model=str(tmp_path / "rm"),
                    prompts_file=str(tmp_path / "prompts.jsonl"), iterations=1, batch_size=4, minibatch_size=4,
                    micro_batch_size=4, max_new_tokens=6, guard_prompts=2, precision="fp32", seed=0)  # fmt: skip
    result = ppo.run(cfg, quiet=True)
    assert math.isfinite(result["ppo/score"])
    assert AutoTokenizer.from_pretrained(tmp_path / "ppo" / "final").pad_token == "<|pad|>"
