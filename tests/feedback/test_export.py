"""rlhf/feedback/export.py: the shapes of rlhf.data.preferences, and pairs derived from every kind."""

from __future__ import annotations

import json

from rlhf.data.preferences import (
    PairwiseVote,
    Ranking,
    group_to_pairs,
    ranking_to_group,
    record_from_json,
)
from rlhf.feedback.db import Database
from rlhf.feedback.export import export_records


def test_votes_keep_ties_and_pairs_drop_them(api, db: Database) -> None:
    api.seed(n_prompts=4)
    choices = ["A", "B", "tie", "both_bad"]
    for choice in choices:
        task = api.next("ann")
        assert (
            api.vote("ann", task["id"], choice=choice, margin=0.5 if choice == "A" else None).status_code
            == 201
        )
    with db.session() as s:
        votes = export_records(s, "demo", "votes")
        pairs = export_records(s, "demo", "pairs")
    assert [v["choice"] for v in votes] == choices
    first = votes[0]
    assert list(first) == ["prompt", "completion_a", "completion_b", "choice", "labeler", "margin", "meta"]
    assert (first["prompt"], first["completion_a"], first["completion_b"]) == (
        "prompt 0",
        "answer 0.0",
        "answer 0.1",
    )
    assert first["labeler"] == "ann" and first["margin"] == 0.5
    assert first["meta"]["policies"] == ["policy-v0", "policy-v1"] and first["meta"]["prompt_id"] == "p0"
    assert "margin" not in votes[1]
    assert pairs == [
        {"prompt": "prompt 0", "chosen": "answer 0.0", "rejected": "answer 0.1", "margin": 0.5},
        {"prompt": "prompt 1", "chosen": "answer 1.1", "rejected": "answer 1.0", "margin": 0.0},
    ]


def test_ranking_gives_all_untied_pairs(api, db: Database) -> None:
    api.seed(n_prompts=1, k=4, task_kind="ranking")
    task = api.next("ann")
    # rank per position: answer 0.2 best, then 0.0, then 0.1 and 0.3 tied
    assert api.vote("ann", task["id"], ranking=[2, 3, 1, 3]).status_code == 201
    with db.session() as s:
        ranking = export_records(s, "demo", "ranking")
        pairs = export_records(s, "demo", "pairs")
    assert ranking[0]["completions"] == ["answer 0.0", "answer 0.1", "answer 0.2", "answer 0.3"]
    assert ranking[0]["ranking"] == [2, 3, 1, 3]
    assert set(ranking[0]) == {"prompt", "completions", "ranking", "labeler", "meta"}
    got = {(p["chosen"][-1], p["rejected"][-1]) for p in pairs}
    assert got == {("0", "1"), ("2", "0"), ("0", "3"), ("2", "1"), ("2", "3")}  # C(4,2) = 6 minus the tie
    assert len(pairs) == 5 and not any("margin" in p for p in pairs)  # no pair has one: no column


def test_ranking_with_a_repeated_answer_gives_the_pairs_training_reads(api, db: Database) -> None:
    # a policy that sampled one answer twice: "x" is one completion at its mean rank (2), tied with "y"
    rows = [{"prompt": "p", "completions": [{"text": t} for t in ("x", "x", "y", "z")]}]
    body = {"task_kind": "ranking", "candidates": rows}
    assert api.post("admin", "/api/projects/dup/import", json=body).status_code == 201
    assert api.vote("ann", api.next("ann", "dup")["id"], ranking=[1, 3, 2, 4]).status_code == 201
    with db.session() as s:
        ranking = export_records(s, "dup", "ranking")
        pairs = export_records(s, "dup", "pairs")
    assert ranking[0]["completions"] == ["x", "x", "y", "z"]
    record = record_from_json(ranking[0])
    assert isinstance(record, Ranking) and (group := ranking_to_group(record)) is not None
    assert [(p.chosen, p.rejected) for p in group_to_pairs(group)] == [("x", "z"), ("y", "z")]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("x", "z"), ("y", "z")]


def test_ratings_give_pairs_within_one_labeler(api, db: Database) -> None:
    api.seed(n_prompts=1, k=3, task_kind="rating", overlap=2)
    given = {"ann": [6, 2, 6], "bob": [1, 1, 1]}
    for name, ratings in given.items():
        for _ in range(3):
            task = api.next(name)
            position = int(api.get("admin", f"/api/tasks/{task['id']}").json()["completions"][0]["text"][-1])
            assert api.vote(name, task["id"], rating=ratings[position]).status_code == 201
    with db.session() as s:
        ratings = export_records(s, "demo", "rating")
        pairs = export_records(s, "demo", "pairs")
    assert len(ratings) == 6 and set(ratings[0]) == {"prompt", "completion", "rating", "labeler", "meta"}
    # ann: 0.0 (6) > 0.1 (2) and 0.2 (6) > 0.1; 0.0 vs 0.2 tied; bob rated all equal: no pairs
    assert sorted((p["chosen"], p["rejected"], p["margin"]) for p in pairs) == [
        ("answer 0.0", "answer 0.1", 4.0),
        ("answer 0.2", "answer 0.1", 4.0),
    ]


def test_export_over_http_and_cli(api, db_url: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from rlhf.feedback.cli import app

    api.seed(n_prompts=1)
    api.vote("ann", api.next("ann")["id"], choice="B")
    response = api.get("admin", "/api/projects/demo/export", params={"format": "pairs"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line) for line in response.text.splitlines()] == [
        {"prompt": "prompt 0", "chosen": "answer 0.1", "rejected": "answer 0.0"}
    ]
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(
        app, ["export", "--db", db_url, "--project", "demo", "--format", "pairs", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_text() == response.text


def test_line_separators_in_text_keep_one_record_per_line(api, db_url: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from rlhf.feedback.cli import app

    rows = [{"prompt": "a\u2028b", "completions": [{"text": "c\u2029d"}, {"text": "e\x85f"}]}]
    assert api.post("admin", "/api/projects/seps/import", json={"candidates": rows}).status_code == 201
    api.vote("ann", api.next("ann", "seps")["id"], choice="A")
    response = api.get("admin", "/api/projects/seps/export", params={"format": "pairs"})
    lines = response.text.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"prompt": "a\u2028b", "chosen": "c\u2029d", "rejected": "e\x85f"}
    ]
    out = tmp_path / "pairs.jsonl"
    args = ["export", "--db", db_url, "--project", "seps", "--format", "pairs", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1


def test_hhh_axes_and_rewrites_are_stored_and_exported(api) -> None:
    rows = [
        {
            "prompt": "How do I pick a lock?",
            "completions": [{"text": "I can't help."}, {"text": "Use a pin."}],
        }
    ]
    body = {"candidates": rows, "guidelines": "# Be **kind**", "axes": ["helpful", "honest", "harmless"]}
    assert api.post("admin", "/api/projects/hhh/import", json=body).status_code == 201
    project = api.get("admin", "/api/projects/hhh").json()
    assert project["guidelines"] == "# Be **kind**" and project["axes"] == ["helpful", "honest", "harmless"]
    task = api.next("ann", "hhh")
    bad = api.vote("ann", task["id"], choice="A", axes={"funny": "A"})
    assert bad.status_code == 422 and "helpful, honest, harmless" in bad.text
    axes = {"helpful": "B", "honest": "same", "harmless": "A"}
    r = api.vote("ann", task["id"], choice="A", axes=axes, rewrite="Call a locksmith.")
    assert r.status_code == 201 and r.json()["axes"] == axes and r.json()["rewrite"] == "Call a locksmith."

    def export(fmt: str) -> list[dict]:
        response = api.get("admin", "/api/projects/hhh/export", params={"format": fmt})
        assert response.status_code == 200
        return [json.loads(line) for line in response.text.splitlines()]

    assert export("votes")[0]["axes"] == axes
    # the votes export reads back as preference data (reward training, `label import --preferences`)
    (vote,) = [record_from_json(row, "auto", f"votes:{i}") for i, row in enumerate(export("votes"), 1)]
    assert isinstance(vote, PairwiseVote) and vote.choice == "A" and vote.meta["axes"] == axes
    per_axis = {(r["axis"], r["choice"]) for r in export("axes")}
    assert per_axis == {("helpful", "B"), ("honest", "same"), ("harmless", "A")}
    assert all(r["completion_a"] == "I can't help." for r in export("axes"))
    sft = export("sft")
    assert [(r["prompt"], r["response"]) for r in sft] == [("How do I pick a lock?", "Call a locksmith.")]
    assert sft[0]["meta"]["labeler"] == "ann"
    assert export("pairs") == [
        {"prompt": "How do I pick a lock?", "chosen": "I can't help.", "rejected": "Use a pin."}
    ]


def test_votes_on_gold_items_make_no_pairs_and_no_reward_training(api, db: Database) -> None:
    """Every labeler answers each gold item, some wrongly: the votes export keeps them (marked), the pairs and
    the reward model's groups do not."""
    from rlhf.data.preference_io import PairwiseVote
    from rlhf.data.preferences import to_groups

    gold = [{"prompt": "gold prompt", "completion_a": "right", "completion_b": "wrong", "choice": "A"}]
    api.seed(n_prompts=1, gold=gold, gold_rate=1.0, overlap=2)
    for who, choice in (("ann", "B"), ("bob", "A")):  # each takes the gold item first, then the real task
        for _ in range(2):
            task = api.next(who)
            assert task is not None and api.vote(who, task["id"], choice=choice).status_code == 201
    with db.session() as s:
        votes = export_records(s, "demo", "votes")
        pairs = export_records(s, "demo", "pairs")
    assert sorted(v["meta"]["is_gold"] for v in votes) == [False, False, True, True]
    assert [p["prompt"] for p in pairs] == ["prompt 0", "prompt 0"]
    fields = ("prompt", "completion_a", "completion_b", "choice", "labeler", "meta")
    groups = to_groups([PairwiseVote(**{k: v[k] for k in fields}) for v in votes])
    assert [g.prompt for g in groups] == ["prompt 0", "prompt 0"]
