"""The whole loop on tiny models of eight architectures, each with a tokenizer that behaves as its family's does
(tests/archs.py): SFT on chat data, a reward model on conversational preferences, two PPO iterations, `rlhf
eval` with the reward model as judge, and `rlhf serve` answering a chat through the model's template.

The families cover what stock models bring: PAD equal to EOS (GPT-2, Phi-3), no PAD (GPT-NeoX), BOS added
before every text (Llama, Mistral, Gemma, Phi-3), ChatML turns (Qwen2) and a mixture of experts (Qwen2-MoE).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from rlhf.config import PPOConfig, RewardConfig, SFTConfig
from rlhf.data.jsonl import write_jsonl
from rlhf.models.heads import load_scalar_model
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import chat_prompt, encode_prompts
from rlhf.runs import read_metrics
from rlhf.serve.main import create_app
from rlhf.serve.settings import Settings
from rlhf.stages import ppo, reward, sft
from tests.archs import save_tiny
from tests.cli import run_cli

ARCHITECTURES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen2_moe", "gemma", "phi3"]
QUESTIONS = [("Name a prime number.", "7 is a prime number.", "Go away."),
             ("Which ocean is the largest?", "The Pacific Ocean.", "Dunno."),
             ("Say hi politely.", "Hi, nice to meet you!", "Hi, idiot."),
             ("Spell the word cat.", "C-A-T.", "Dog.")]  # fmt: skip


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chat demonstrations, conversational preferences (TRL layout) and chat prompts."""
    root = tmp_path_factory.mktemp("arch_data")
    write_jsonl(root / "sft.jsonl", [{"messages": user(q) + assistant(good)} for q, good, _ in QUESTIONS * 4])
    write_jsonl(root / "prefs.jsonl", [{"prompt": user(q), "chosen": assistant(good), "rejected": assistant(bad)}
                                       for q, good, bad in QUESTIONS * 4])  # fmt: skip
    write_jsonl(root / "prompts.jsonl", [{"messages": user(q)} for q, _, _ in QUESTIONS])
    return root


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sft_reward_ppo_eval_serve(arch: str, data: Path, tmp_path: Path) -> None:
    base = save_tiny(arch, tmp_path / "base")
    routed = arch.endswith("_moe")  # a mixture of experts that asks for its load-balancing loss in training
    if routed:
        config = json.loads((base / "config.json").read_text())
        config |= {"output_router_logits": True, "router_aux_loss_coef": 0.02}
        (base / "config.json").write_text(json.dumps(config))
    common = {"precision": "fp32", "warmup_steps": 0, "log_every": 1, "save_every": 1000}

    # 1. SFT on chat rows: the checkpoint's tokenizer has a PAD of its own
    sft.run(SFTConfig(out_dir=str(tmp_path / "sft"), model=str(base), train_file=str(data / "sft.jsonl"),
                      max_seq_len=64, batch_size=8, micro_batch_size=8, max_steps=2, lr=1e-3, eval_fraction=0,
                      **common), quiet=True)  # fmt: skip
    policy = tmp_path / "sft" / "final"
    tokenizer = load_tokenizer(str(policy))
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(read_metrics(tmp_path / "sft" / "metrics.jsonl")) >= 2

    # 2. a reward model on conversational preferences, from the SFT checkpoint
    reward.run(RewardConfig(out_dir=str(tmp_path / "rm"), model=str(policy), train_file=str(data / "prefs.jsonl"),
                            batch_size=8, micro_batch_size=8, max_steps=2, lr=1e-3, max_seq_len=64,
                            eval_fraction=0, normalise={"enabled": False}, **common), quiet=True)  # fmt: skip
    rm = load_scalar_model(str(tmp_path / "rm" / "final"))
    assert rm.config.pad_token_id == tokenizer.pad_token_id

    # 3. two PPO iterations on chat prompts: the policy moves
    ppo.run(PPOConfig(out_dir=str(tmp_path / "ppo"), policy=str(policy), reward_model=str(tmp_path / "rm" / "final"),
                      prompts_file=str(data / "prompts.jsonl"), iterations=2, batch_size=4, minibatch_size=2,
                      micro_batch_size=2, epochs=1, max_new_tokens=6, lr=1e-3, critic_lr=1e-3,
                      ptx_file=str(data / "sft.jsonl"), ptx_coef=0.5 if routed else 0.0, ptx_batch_size=2, **common),
            quiet=True)  # fmt: skip
    ppo_rows = [r for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl") if "ppo/score" in r]
    scores = [r["ppo/score"] for r in ppo_rows]
    assert len(scores) == 2 and all(map(torch.isfinite, torch.tensor(scores)))
    if (
        routed
    ):  # every model that trains adds its routers' loss: SFT, the reward model, PPO's policy and critic
        assert read_metrics(tmp_path / "sft" / "metrics.jsonl")[0]["sft/aux_loss"] > 0
        assert read_metrics(tmp_path / "rm" / "metrics.jsonl")[0]["rm/aux_loss"] > 0
        assert all(r[f"ppo/{k}aux_loss"] > 0 for r in ppo_rows for k in ("", "critic_", "ptx_"))
    before, after = (
        load_causal_lm(str(policy)).state_dict(),
        load_causal_lm(str(tmp_path / "ppo" / "final")).state_dict(),
    )
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 0

    # 4. rlhf eval with the reward model as judge: a win rate, and no demo-only metrics on these prompts
    out = tmp_path / "eval.json"
    proc = run_cli("eval", str(tmp_path / "ppo" / "final"), str(policy), "--out", str(out),
                   "--set", f"eval.prompts_file={data / 'prompts.jsonl'}", "--set", "eval.judge=reward_model",
                   "--set", f"eval.judge_model={tmp_path / 'rm' / 'final'}", "--set", "eval.max_new_tokens=6",
                   "--set", "eval.precision=fp32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["n_prompts"] == len(QUESTIONS) and 0 <= summary["win_rate_a"] <= 1
    assert "correct_rate" not in summary["a"]

    # 5. rlhf serve answers a chat: the prompt is the model's template with its generation prompt
    messages = user("Name a prime number.")
    expected_prompt = encode_prompts(tokenizer, [chat_prompt(tokenizer, messages)])[0]
    with TestClient(create_app(Settings(model_dir=str(tmp_path / "ppo" / "final"), model_name=arch))) as http:
        r = http.post("/v1/chat/completions", json={"model": arch, "messages": messages, "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(expected_prompt)
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
