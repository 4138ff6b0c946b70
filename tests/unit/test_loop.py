"""rlhf/loop.py helpers: each round's prompts are a pure function of (seed, round), new ones never repeat,
a share comes back from earlier rounds; candidate pairs leave identical answers out; the loop config loads."""

from __future__ import annotations

from pathlib import Path

from rlhf.config import load_config
from rlhf.loop import candidate_pairs, pending, round_prompts

REPO = Path(__file__).resolve().parents[2]


def test_round_prompts_are_fixed_by_seed_and_round_and_mix_old_and_new() -> None:
    pool = [{"prompt": f"q{i}", "prompt_id": f"p{i}"} for i in range(100)]
    cfg = load_config(None, ["loop.prompts_per_round=20", "loop.share_old_prompts=0.25"])
    rounds = [round_prompts(pool, r, cfg) for r in (1, 2, 3)]
    assert rounds[1] == round_prompts(pool, 2, cfg)
    ids = [{row["prompt_id"] for row in rows} for rows in rounds]
    assert [len(s) for s in ids] == [20, 20, 20]
    assert len(ids[1] & ids[0]) == 5  # 25% of round 2 comes back from round 1
    assert ids[2] - (ids[0] | ids[1]) and len(ids[2] & (ids[0] | ids[1])) == 5  # 15 new, 5 earlier
    other = load_config(None, ["loop.prompts_per_round=20", "loop.seed=1"])
    assert {row["prompt_id"] for row in round_prompts(pool, 1, other)} != ids[0]


def test_candidate_pairs_skip_identical_answers() -> None:
    rows = [{"prompt": "q", "completions": [{"text": "a"}, {"text": "b"}, {"text": "a"}]}]
    assert candidate_pairs(rows) == [(0, 0, 1), (0, 1, 2)]


def test_pending_reads_the_finished_phases() -> None:
    done = {(1, "generate"): {}}
    assert not pending(done, 1, "generate") and pending(done, 1, "tasks") and pending(done, 2, "generate")


def test_demo_config_has_a_loop_section() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.loop.rounds == 3 and cfg.loop.active and cfg.loop.sft_policy == "runs/demo/sft/final"
