"""People as the judge: pairs pushed into an SQLite labeling store, votes cast through the labeling API,
outcomes for policy A read back; and the same round trip through `rlhf eval`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.errors import ConfigError
from rlhf.feedback.client import FeedbackClient
from rlhf.feedback.db import Database
from rlhf.feedback.projects import get_project
from rlhf.feedback.testing import make_user, run_server
from rlhf.judges.people import collect_outcomes, push_pairs
from tests.cli import run_cli

PROMPTS = [f"Question {i}?" for i in range(5)]
TEXTS_A = ["good 0", "good 1", "good 2", "same", "good 4"]
TEXTS_B = ["bad 0", "bad 1", "bad 2", "same", "bad 4"]


def vote_all(db_url: str, project: str, decide: dict[str, str]) -> int:
    """One labeler votes on every task of `project`: `decide[prompt]` is "good", "bad" or "tie" (which
    answer wins); prompts not in `decide` are skipped. Returns the number of votes."""
    token = make_user(db_url, "ann")
    n = 0
    with run_server(db_url) as url, FeedbackClient(url, token) as client:
        seen = set()
        while (task := client.next_task(project)) is not None and task["id"] not in seen:
            seen.add(task["id"])
            want = decide.get(task["prompt"])
            if want is None:
                client.skip(task["id"])
                continue
            texts = [c["text"] for c in sorted(task["completions"], key=lambda c: c["position"])]
            choice = "tie" if want == "tie" else "AB"[[t.startswith(want) for t in texts].index(True)]
            client.vote(task["id"], choice=choice)
            n += 1
    return n


def test_votes_come_back_as_outcomes_for_a(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/feedback.db"
    counts = push_pairs(PROMPTS, TEXTS_A, TEXTS_B, "eval-ab", db=db_url, guidelines="Which is more honest?")
    assert counts["tasks"] == 4  # identical answers make no task
    store = Database(db_url)
    with store.session() as session:
        assert (
            get_project(session, "eval-ab").guidelines == "Which is more honest?"
        )  # the principle, for people
    store.dispose()
    n = vote_all(db_url, "eval-ab", {"Question 0?": "good", "Question 1?": "bad", "Question 2?": "tie"})
    outcomes, n_votes = collect_outcomes(
        "eval-ab", list(zip(PROMPTS, TEXTS_A, TEXTS_B, strict=True)), db=db_url
    )
    assert n == n_votes == 3
    assert outcomes == [1.0, 0.0, 0.5, None, None]  # prompt 3: no task; prompt 4: skipped, no vote yet


def test_rlhf_eval_pushes_then_collects_a_win_rate(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path
) -> None:
    db_url = f"sqlite:///{tmp_path}/feedback.db"
    pending = tmp_path / "eval.json"
    sft = str(tiny_sft_model)
    settings = ["--set", "eval.judge=people", "--set", f"eval.judge_db={db_url}", "--set", "eval.judge_project=ab",
                "--set", "eval.bootstrap=200"]  # fmt: skip
    args = ["eval", sft, sft, "--out", str(pending), "--set", f"eval.prompts_file={demo_data / 'eval_prompts.jsonl'}",
            "--set", "eval.n_prompts=6", "--set", "eval.max_new_tokens=8", "--set", "eval.precision=fp32", *settings]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "rlhf eval --collect" in result.output
    waiting = json.loads(pending.read_text())
    assert waiting["status"] == "awaiting votes" and "win_rate_a" not in waiting
    rows = waiting["rows"]
    # the labeler always prefers policy A's answer (position 0 holds A's answer: its text)
    decide = {r["prompt"]: r["a"][:8] for r in rows if r["a"] != r["b"]}
    assert len(decide) == len({r["prompt"] for r in rows if r["a"] != r["b"]})  # distinct prompts

    vote_all(db_url, "ab", {p: "tie" if not a.strip() else a for p, a in decide.items()})
    result = CliRunner().invoke(app, ["eval", "--collect", str(pending), *settings])
    assert result.exit_code == 0, result.output
    summary = json.loads(pending.read_text())
    wins = sum(r["a"] != r["b"] and bool(r["a"].strip()) for r in rows)
    assert summary["status"] == "collected" and summary["n_judged"] == 6
    assert (summary["wins_a"], summary["ties"], summary["losses_a"]) == (wins, 6 - wins, 0)
    assert summary["win_rate_a"] == (wins + 0.5 * (6 - wins)) / 6
    assert "win rate of A over B (people judge, 6 prompts" in result.output


def test_collect_from_a_file_that_is_not_a_summary_is_a_one_line_error(tmp_path: Path) -> None:
    settings = ["--set", "eval.judge=people", "--set", f"eval.judge_db=sqlite:///{tmp_path}/feedback.db"]
    votes = tmp_path / "votes.jsonl"
    votes.write_text('{"prompt": "q"}\n{"prompt": "r"}\n')  # JSONL, not the pushed summary
    result = run_cli("eval", "--collect", str(votes), *settings)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --collect: {votes}:2: not valid JSON (Extra data)"
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    result = run_cli("eval", "--collect", str(listed), *settings)
    assert result.returncode == 1 and "is not the summary that `rlhf eval` wrote" in result.stderr
    # the summary names its policies: others given beside it would be ignored
    result = run_cli("eval", "some/policy", "other/policy", "--collect", str(listed), *settings)
    assert result.returncode == 1 and "--collect completes the evaluation its summary names" in result.stderr


def test_collecting_from_a_store_that_is_not_there_says_so_and_creates_none(tmp_path: Path) -> None:
    """A mistyped store path: one line, and no empty database left where it pointed."""
    missing = tmp_path / "other.db"
    with pytest.raises(ConfigError, match=f"^no feedback store at sqlite:///{re.escape(str(missing))}$"):
        collect_outcomes("eval-a-vs-b", [("q", "a", "b")] * 4, db=f"sqlite:///{missing}")
    assert not missing.exists()


def test_collecting_before_anyone_voted_reports_no_win_rate(tmp_path: Path) -> None:
    """A pair of identical answers is a tie without a vote, but with no vote at all there is no verdict: the
    summary stays as it was pushed."""
    db_url = f"sqlite:///{tmp_path}/feedback.db"
    push_pairs(PROMPTS, TEXTS_A, TEXTS_B, "eval-ab", db=db_url)
    pending = tmp_path / "eval.json"
    rows = [{"prompt": p, "a": a, "b": b} for p, a, b in zip(PROMPTS, TEXTS_A, TEXTS_B, strict=True)]
    pending.write_text(json.dumps({"judge": "people", "project": "eval-ab", "n_prompts": 5, "rows": rows}))
    before = pending.read_text()
    result = run_cli(
        "eval", "--collect", str(pending), "--set", "eval.judge=people", "--set", f"eval.judge_db={db_url}"
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: no verdicts yet: nobody has voted on the pairs in project eval-ab"
    assert pending.read_text() == before


def test_two_evaluations_in_one_project_read_back_their_own_votes(tmp_path: Path) -> None:
    """A second evaluation pushed to the same project had its pairs skipped as already there (the same prompt
    ids, eval-0...), and its --collect read the first evaluation's votes as its own: a confident win rate for
    pairs nobody judged. Votes now count for the pairs whose prompt and answers they judged, A's side told by
    its text; a pair both evaluations ask (one task) counts for both, each from its own side."""
    from rlhf.judges.people import evaluation_id

    db = f"sqlite:///{tmp_path}/fb.db"
    other_a = [f"other {i}" for i in range(len(PROMPTS))]
    first, second = evaluation_id(PROMPTS, TEXTS_A, TEXTS_B), evaluation_id(PROMPTS, other_a, TEXTS_A)
    push_pairs(PROMPTS, TEXTS_A, TEXTS_B, "p", db=db, eval_id=first)
    assert push_pairs(PROMPTS, other_a, TEXTS_A, "p", db=db, eval_id=second)["tasks"] == 5  # its own tasks
    assert push_pairs(PROMPTS, TEXTS_A, TEXTS_B, "p", db=db, eval_id=first)["skipped"] == 5  # pushed again
    vote_all(db, "p", {p: "good" for p in PROMPTS[:3]})  # the first's tasks: the good answer wins
    firsts, n = collect_outcomes("p", list(zip(PROMPTS, TEXTS_A, TEXTS_B, strict=True)), db=db)
    seconds, m = collect_outcomes("p", list(zip(PROMPTS, other_a, TEXTS_A, strict=True)), db=db)
    assert firsts[:3] == [1.0, 1.0, 1.0] and n == 3
    # the second's own pairs were voted on too (good 0 beats other 0: B wins), none read from the first's
    assert seconds[:3] == [0.0, 0.0, 0.0] and m == 3
    swapped, _ = collect_outcomes("p", list(zip(PROMPTS, TEXTS_B, TEXTS_A, strict=True)), db=db)
    assert swapped[:3] == [0.0, 0.0, 0.0]  # the first's pairs asked the other way round: from B's side
