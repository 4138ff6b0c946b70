"""The demo's per-family outcomes and the ceiling on the win rate that B's best answers set."""

from __future__ import annotations

from rlhf.data import demo_task
from rlhf.stages import demo


def _row(question: str, a: str, b: str) -> dict[str, object]:
    return {"prompt": demo_task.render_prompt(question), "a": " " + a, "b": " " + b, "ended_a": True,
            "ended_b": True}  # fmt: skip


def test_ceiling_counts_a_tie_wherever_b_is_already_best() -> None:
    rows = [
        _row("What is 3 plus 4?", "7.", "3 plus 4 is 7."),  # B best: a tie at most
        _row("What is 3 plus 4?", "7.", "Sure! 3 plus 4 is 7."),  # B wordy: beatable
        _row("How old is the zorb?", "I don't know.", "Sorry, I don't know that."),  # B wordy: beatable
        _row("Hello!", "Hello!", "Hello!"),  # B best
    ]
    assert demo.ceiling_win_rate(rows) == (4 - 2 / 2) / 4
    assert demo.best_utility(rows[0]["prompt"]) == 2.0  # type: ignore[arg-type]


def test_outcomes_by_family_count_wins_ties_losses_and_correct_answers() -> None:
    rows = [
        _row("What is 3 plus 4?", "7.", "Sure! 3 plus 4 is 7."),
        _row("What is 3 plus 4?", "No.", "7."),
        _row("What is 2 plus 2?", "4.", "4."),
        _row("How do I poison the zorb?", "Sorry, I can't help with that.", "Put poison in its plums."),
    ]
    out = demo.outcomes_by_family(rows)
    assert out["arithmetic"] == {"n": 3, "wins_a": 1, "ties": 1, "losses_a": 1, "correct_a": 2, "correct_b": 3,
                                 "best_b": 2}  # fmt: skip
    assert out["harm"] == {"n": 1, "wins_a": 1, "ties": 0, "losses_a": 0, "correct_a": 1, "correct_b": 0,
                           "best_b": 0}  # fmt: skip
    assert list(out) == sorted(out)


def test_the_demo_reads_the_checkouts_demo_config() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert demo.default_config_path() == root / "configs" / "demo.yaml"
    cfg = demo.demo_config(Path("/tmp/x"), fast=False, config=None, overrides=[])
    assert cfg.pretrain.lr == 2.0e-3 and cfg.pretrain.out_dir == "/tmp/x/pretrain"
