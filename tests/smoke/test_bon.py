"""`rlhf bon` on tiny models: n answers per prompt, the reward model's favourite kept, written as SFT data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from rlhf.config import BonConfig
from rlhf.engine import best_of_n as bon_engine
from rlhf.engine.best_of_n import kl_bound
from rlhf.errors import DataError
from rlhf.models.heads import build_scalar_model, set_normalisation
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import stop_ids
from rlhf.stages import bon as bon_stage
from rlhf.stages.bon import run as run_bon
from rlhf.train.demonstrations import read_demonstrations, tokenize_demonstrations
from rlhf.train.lm_loop import IGNORE
from tests.archs import CONTEXT, save_tiny


def test_best_of_n_keeps_the_highest_scored_answer(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    out = tmp_path / "bon.jsonl"
    cfg = BonConfig(policy=str(tiny_sft_model), reward_model=str(tiny_reward_model),
                    prompts_file=str(demo_data / "eval_prompts.jsonl"), out=str(out), n=4, max_prompts=6,
                    max_new_tokens=12, batch_size=8, precision="fp32", no_eos_penalty=-3.0)  # fmt: skip
    summary = run_bon(cfg)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["prompts"] == 6 and len(rows) == summary["written"] == 6 - summary["unfinished"]
    for row in rows:
        assert len(row["scores"]) == 4 and all(math.isfinite(s) for s in row["scores"])
        assert row["score"] == max(row["scores"]) and row["ended"]  # SFT data: answers that end
    assert summary["best_score"] >= summary["mean_score"]
    assert summary["kl_bound"] == pytest.approx(math.log(4) - 3 / 4)
    # the kept answers are SFT demonstrations for rejection-sampling fine-tuning
    demos = read_demonstrations(out, load_tokenizer(str(tiny_sft_model)))
    assert [p for p, _ in demos] == [r["prompt"] for r in rows]


def policy_and_reward_model(stock: Path, tmp_path: Path) -> tuple[Path, Any]:
    """TMP/policy: `stock` with the PAD that load_tokenizer adds where it has none of its own (GPT-2's is its
    EOS), as sft saves it; TMP/rm: a reward model with a fresh head on it. The policy's path and tokenizer."""
    policy = tmp_path / "policy"
    tokenizer = load_tokenizer(str(stock))
    load_causal_lm(str(stock), tokenizer=tokenizer).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    rm = build_scalar_model(str(policy), seed=0)
    set_normalisation(rm, 0.0, 1.0)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return policy, tokenizer


def test_prompt_longer_than_the_context_is_cut_for_the_reward_model_too(tmp_path: Path) -> None:
    # GPT-2 has learned positions: a sequence past its context is an IndexError, not a silent extrapolation
    policy, _ = policy_and_reward_model(save_tiny("gpt2", tmp_path / "gpt2"), tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    long = "User: " + "What is 2 plus 3? " * CONTEXT + "\nAssistant:"
    prompts.write_text(
        json.dumps({"prompt": "User: Hello!\nAssistant:"}) + "\n" + json.dumps({"prompt": long}) + "\n"
    )
    out = tmp_path / "bon.jsonl"
    cfg = BonConfig(policy=str(policy), reward_model=str(tmp_path / "rm"), prompts_file=str(prompts),
                    out=str(out), n=2, max_new_tokens=8, precision="fp32", no_eos_penalty=None,
                    keep_unfinished=True)  # fmt: skip
    run_bon(cfg)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["User: Hello!\nAssistant:", long]
    assert all(math.isfinite(s) for r in rows for s in r["scores"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_best_of_n_samples_and_scores_on_the_gpu(
    tmp_path: Path,
    tiny_sft_model: Path,
    tiny_reward_model: Path,
    demo_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    devices: list[str] = []
    score = bon_engine.sequence_rewards
    monkeypatch.setattr(bon_engine, "sequence_rewards", lambda m, ids, mask: devices.append(ids.device.type)
                        or score(m, ids, mask))  # fmt: skip
    cfg = BonConfig(policy=str(tiny_sft_model), reward_model=str(tiny_reward_model),
                    prompts_file=str(demo_data / "eval_prompts.jsonl"), out=str(tmp_path / "bon.jsonl"), n=2,
                    max_prompts=4, max_new_tokens=8, precision="fp32")  # fmt: skip
    assert run_bon(cfg)["prompts"] == 4
    assert devices and set(devices) == {"cuda"}


def test_kl_bound_by_hand() -> None:
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)


def test_missing_prompts_file_is_a_clear_error(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path
) -> None:
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    cfg = BonConfig(policy=str(tiny_sft_model), reward_model=str(tiny_reward_model), prompts_file=str(empty),
                    out=str(tmp_path / "bon.jsonl"))  # fmt: skip
    with pytest.raises(DataError, match="no prompts"):
        run_bon(cfg)
    assert not (tmp_path / "bon.jsonl").exists()


def test_a_prompt_whose_answers_never_end_is_left_out_unless_kept(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    """With room for 1 token no answer ends: SFT on them would learn a cut answer followed by EOS."""
    base = dict(policy=str(tiny_sft_model), reward_model=str(tiny_reward_model),
                prompts_file=str(demo_data / "eval_prompts.jsonl"), n=2, max_prompts=3, max_new_tokens=1,
                precision="fp32", no_eos_penalty=-3.0)  # fmt: skip
    left_out = run_bon(BonConfig(**base, out=str(tmp_path / "a.jsonl")))
    assert left_out["prompts"] == left_out["unfinished"] == 3 and left_out["written"] == 0
    assert (tmp_path / "a.jsonl").read_text() == ""
    kept = run_bon(BonConfig(**base, out=str(tmp_path / "b.jsonl"), keep_unfinished=True))
    rows = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert kept["written"] == 3 and [r["ended"] for r in rows] == [False] * 3


def ends_its_turn_early(model: PreTrainedModel, end_of_turn: int, special: list[int]) -> PreTrainedModel:
    """The model with an output layer of the same odds whatever it reads: about one in five for the end-of-turn
    token, none for other special tokens, the rest shared by the text tokens; so answers end after a few words."""
    vocab = model.get_output_embeddings().weight.shape[0]
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[special] = -100.0
        head.bias[end_of_turn] = math.log(vocab / 4)
    model.set_output_embeddings(head)
    return model


def test_an_answer_to_a_chat_prompt_trains_sft_through_the_end_of_turn_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rejection-sampling SFT on a chat model: a prompt given as messages comes back as messages with the answer
    as the assistant's turn, so SFT trains the turn to end with <|im_end|> (as a `messages` demonstration of the
    same text does, and as the policy ends its turns), not with EOS. A plain-text prompt keeps EOS, as before."""
    # ChatML: <|im_end|> ends a turn, EOS is <|endoftext|>
    policy, tokenizer = policy_and_reward_model(save_tiny("qwen2", tmp_path / "qwen2"), tmp_path)
    eos, im_end = stop_ids(tokenizer)
    load = bon_stage.load_causal_lm
    monkeypatch.setattr(bon_stage, "load_causal_lm", lambda *a, **k: ends_its_turn_early(
        load(*a, **k), im_end, [t for t in tokenizer.all_special_ids if t != im_end]))  # fmt: skip
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is the sky green?"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"messages": chat}) + "\n" + json.dumps({"prompt": "User: Hello!\nAssistant:"}) + "\n"
    )
    out = tmp_path / "bon.jsonl"
    run_bon(BonConfig(policy=str(policy), reward_model=str(tmp_path / "rm"), prompts_file=str(prompts),
                      out=str(out), n=2, max_new_tokens=16, precision="fp32", keep_unfinished=True))  # fmt: skip

    chat_row, plain_row = [json.loads(line) for line in out.read_text().splitlines()]
    assert chat_row["ended"] and chat_row["response"]  # a few words, then the end of the turn
    assert chat_row["messages"] == [*chat, {"role": "assistant", "content": chat_row["response"]}]
    assert chat_row["prompt"] == tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert "messages" not in plain_row
    demos = read_demonstrations(out, tokenizer)
    assert [p for p, _ in demos] == [chat_row["prompt"], plain_row["prompt"]]  # what the policy sampled after
    (from_chat, from_plain), _, _ = tokenize_demonstrations(demos, tokenizer, CONTEXT)
    answer = [t for t in from_chat["labels"] if t != IGNORE]
    assert answer[-1] == im_end and eos not in answer
    assert tokenizer.decode(answer[:-1]) == chat_row["response"]
    # the same as a `messages` demonstration of the same conversation and answer
    demonstration = tmp_path / "demonstration.jsonl"
    demonstration.write_text(json.dumps({"messages": chat_row["messages"]}) + "\n")
    (expected,), _, _ = tokenize_demonstrations(
        read_demonstrations(demonstration, tokenizer), tokenizer, CONTEXT
    )
    assert from_chat == expected
    assert from_plain["labels"][-1] == eos  # a plain-text prompt's answer ends with EOS, as before
