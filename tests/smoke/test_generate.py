"""`rlhf generate` and `rlhf data label-offline` on the tiny SFT policy: the candidates file, then votes."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import GenerateConfig
from rlhf.data.preferences import PairwiseVote, read_preferences
from rlhf.stages import generate


def test_generate_writes_k_candidates_per_prompt_with_lineage(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path
) -> None:
    cfg = GenerateConfig(model=str(tiny_sft_model), prompts_file=str(demo_data / "rl_prompts.jsonl"),
                         out=str(tmp_path / "a.jsonl"), k=3, max_prompts=5, max_new_tokens=12, top_k=50,
                         top_p=0.9, temperature=0.8, seed=7, batch_size=4, precision="fp32")  # fmt: skip
    summary = generate.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    prompts = [
        json.loads(line)["prompt"] for line in (demo_data / "rl_prompts.jsonl").read_text().splitlines()[:5]
    ]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["prompt_id"] for r in rows] == [f"rl_prompts:{i}" for i in range(1, 6)]
    assert all(len(r["completions"]) == 3 for r in rows)
    first = rows[0]["completions"][0]
    assert first["policy"] == "sft/final"  # the checkpoint's run and directory
    assert first["sampling"] == {
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 50,
        "max_new_tokens": 12,
        "seed": 7,
    }
    reasons = [c["finish_reason"] for r in rows for c in r["completions"]]
    assert set(reasons) <= {"stop", "length"}
    assert summary["eos_rate"] == reasons.count("stop") / 15 and summary["completions"] == 15
    # same seed, same candidates; another seed, other ones
    generate.run(cfg.model_copy(update={"out": str(tmp_path / "b.jsonl")}))
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    generate.run(cfg.model_copy(update={"out": str(tmp_path / "c.jsonl"), "seed": 8}))
    assert (tmp_path / "c.jsonl").read_text() != (tmp_path / "a.jsonl").read_text()


def test_cli_generate_then_label_offline(tmp_path: Path, tiny_sft_model: Path, demo_data: Path) -> None:
    runner = CliRunner()
    candidates, votes = tmp_path / "cand.jsonl", tmp_path / "votes.jsonl"
    result = runner.invoke(app, ["generate", "-q", "--out", str(candidates), "--policy-version", "v1",
                                 "--set", f"generate.model={tiny_sft_model}", "--set", "generate.k=4",
                                 "--set", f"generate.prompts_file={demo_data / 'rl_prompts.jsonl'}",
                                 "--set", "generate.max_prompts=6", "--set", "generate.max_new_tokens=8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "24 answers to 6 prompts by v1" in result.output
    result = runner.invoke(app, ["data", "label-offline", "--candidates", str(candidates), "--out", str(votes),
                                 "--set", "panel.pairs_per_prompt=3", "--set", "panel.size=2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "18 votes on 6 prompts by 2 simulated labelers" in result.output
    records = read_preferences(votes)
    assert len(records) == 18 and all(isinstance(r, PairwiseVote) for r in records)
    assert {r.labeler for r in records} <= {"sim-0", "sim-1"}
    assert {r.meta["policy_a"] for r in records if isinstance(r, PairwiseVote)} == {"v1"}


def test_extra_models_add_their_own_answers_and_leave_the_policys_alone(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path
) -> None:
    import shutil

    other = tmp_path / "pretrain" / "final"
    shutil.copytree(tiny_sft_model, other)
    base = GenerateConfig(model=str(tiny_sft_model), prompts_file=str(demo_data / "rl_prompts.jsonl"),
                          out=str(tmp_path / "a.jsonl"), k=2, max_prompts=4, max_new_tokens=10, seed=3,
                          batch_size=8, precision="fp32")  # fmt: skip
    generate.run(base)
    mixed = base.model_copy(
        update={"out": str(tmp_path / "b.jsonl"), "extra_models": [str(other)], "extra_k": 3}
    )
    summary = generate.run(mixed)
    plain = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    for p, r in zip(plain, rows, strict=True):
        assert r["completions"][:2] == p["completions"]  # the policy's own answers are unchanged
        extra = r["completions"][2:]
        assert 1 <= len(extra) <= 3 and {c["policy"] for c in extra} == {"pretrain/final"}
        assert {c["sampling"]["seed"] for c in extra} == {4}  # its own seed, the one it sampled from
        texts = [c["text"] for c in r["completions"]]
        assert len(texts) == len(set(texts))  # no answer twice
    assert summary["completions"] == sum(len(r["completions"]) for r in rows)


def test_other_k_adds_answers_the_policy_gave_to_other_prompts(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path
) -> None:
    base = GenerateConfig(model=str(tiny_sft_model), prompts_file=str(demo_data / "rl_prompts.jsonl"),
                          out=str(tmp_path / "a.jsonl"), k=3, max_prompts=6, max_new_tokens=10, seed=5,
                          batch_size=8, precision="fp32")  # fmt: skip
    generate.run(base)
    generate.run(base.model_copy(update={"out": str(tmp_path / "b.jsonl"), "other_k": 2}))
    plain = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    answers = {r["prompt_id"]: [c["text"] for c in r["completions"]] for r in plain}
    n_other = 0
    for p, r in zip(plain, rows, strict=True):
        assert r["completions"][:3] == p["completions"]  # the prompt's own answers are unchanged
        texts = [c["text"] for c in r["completions"]]
        assert len(texts) == len(set(texts))  # no answer twice
        for c in r["completions"][3:]:
            source = c["sampling"]["answer_to"]
            assert source != r["prompt_id"] and c["text"] in answers[source]  # another prompt's own answer
            assert c["policy"] == p["completions"][0]["policy"]
            n_other += 1
    assert n_other > 0
    # the same seed draws the same answers
    generate.run(base.model_copy(update={"out": str(tmp_path / "c.jsonl"), "other_k": 2}))
    assert (tmp_path / "c.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
