"""rlhf/feedback/loop_state.py and the loop's tables (SQLite and PostgreSQL): phases recorded with their rows in
one transaction, never twice; tasks with chosen pairs keyed by round; vote counts per round; lineage; status;
the admin page's leaderboard."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from rlhf.feedback import loop_state
from rlhf.feedback.db import Database
from rlhf.feedback.errors import Conflict
from rlhf.feedback.leaderboard import loop_judgements
from rlhf.feedback.models import LoopPhase, PolicyVersion, RewardModelVersion

from .test_pages import log_in


def cross_version_rows(round_: int, n: int) -> list[dict]:
    """n prompts with answers by sft (0, 1) and r1 (2); only the pairs (0, 2) and (1, 2) are asked for."""
    return [
        {
            "prompt": f"prompt {i}",
            "prompt_id": f"{loop_state.round_prefix(round_)}p{i}",
            "completions": [
                {"text": f"sft answer {i}.0", "policy": "sft"},
                {"text": f"sft answer {i}.1", "policy": "sft"},
                {"text": f"r1 answer {i}", "policy": "r1"},
            ],
            "pairs": [[0, 2], [1, 2]],
            "meta": {"round": round_, "selection": "random"},
        }
        for i in range(n)
    ]


def register_versions(db: Database) -> None:
    with db.session() as s:
        loop = loop_state.get_or_create_loop(s, "demo", {"rounds": 2})
        loop_state.finish_phase(s, loop, 0, "register", {}, [PolicyVersion(loop_id=loop.id, name="sft", round=0,
                                parent=None, reward_model=None, path="/m/sft", metrics={})])  # fmt: skip
        rm = RewardModelVersion(loop_id=loop.id, name="rm-r1", round=1, parent=None, path="/m/rm1", n_votes=4,
                                vote_ids=[1, 2, 3, 4], metrics={"gold/rm_accuracy": 0.8})  # fmt: skip
        loop_state.finish_phase(s, loop, 1, "reward", {"votes": 4}, [rm])
        r1 = PolicyVersion(loop_id=loop.id, name="r1", round=1, parent="sft", reward_model="rm-r1", path="/m/r1",
                           metrics={"win_rate_vs_sft": 0.7, "ci95": [0.6, 0.8],
                                    "eval": {"baseline": "sft", "wins": 7, "ties": 0, "losses": 3}})  # fmt: skip
        loop_state.finish_phase(s, loop, 1, "register", {"policy": "r1"}, [r1])


def test_a_phase_is_recorded_once_with_its_rows(db: Database) -> None:
    register_versions(db)
    with db.session() as s:
        loop = loop_state.get_or_create_loop(s, "demo", {"rounds": 99})  # the existing run, config unchanged
        assert loop.config == {"rounds": 2}
        assert set(loop_state.finished_phases(s, loop)) == {(0, "register"), (1, "reward"), (1, "register")}
        again = RewardModelVersion(loop_id=loop.id, name="rm-r1b", round=1, parent=None, path="/x", n_votes=0,
                                   vote_ids=[], metrics={})  # fmt: skip
        # the phase is already finished (another `rlhf loop` of this name): one line, and neither row is written
        with pytest.raises(
            Conflict, match=r"^loop demo: round 1's reward phase was recorded meanwhile by another"
        ):
            loop_state.finish_phase(s, loop, 1, "reward", {}, [again])
    with db.session() as s:
        assert s.scalar(select(func.count(RewardModelVersion.id))) == 1
        assert s.scalar(select(func.count(LoopPhase.id))) == 3


def test_an_unknown_loop_name_lists_the_loops_there(db: Database) -> None:
    from rlhf.feedback.errors import NotFound

    with db.session() as s:
        with pytest.raises(NotFound, match="it has none"):
            loop_state.get_loop(s, "loop")
        loop_state.get_or_create_loop(s, "tiny", {})
        loop_state.get_or_create_loop(s, "big", {})
        with pytest.raises(NotFound, match=r"no loop named 'loop'.*the loops there: tiny, big"):
            loop_state.get_loop(s, "loop")


def test_tasks_of_a_round_are_keyed_and_counted(api, db: Database) -> None:
    body = {"candidates": cross_version_rows(1, 3)}
    first = api.post("admin", "/api/projects/demo/import", json=body).json()
    assert first["tasks"] == 6  # two chosen pairs per prompt, not the three of C(3, 2)
    again = api.post("admin", "/api/projects/demo/import", json=body).json()
    assert again["tasks"] == 0 and again["skipped"] == 3
    for who in ("ann", "bob"):
        task = api.next(who)
        assert api.vote(who, task["id"], choice="B").status_code in (200, 201)
    with db.session() as s:
        assert loop_state.round_counts(s, "demo", 1) == (6, 2)
        assert loop_state.round_counts(s, "demo", 2) == (0, 0)


def test_bad_pairs_are_rejected(api) -> None:
    rows = cross_version_rows(1, 1)
    rows[0]["pairs"] = [[0, 3]]
    assert api.post("admin", "/api/projects/demo/import", json={"candidates": rows}).status_code == 422


def test_lineage_status_and_leaderboard(api, db: Database) -> None:
    register_versions(db)
    api.post("admin", "/api/projects/demo/import", json={"candidates": cross_version_rows(1, 2)})
    for who in ("ann", "bob", "cat"):
        task = api.next(who)
        api.vote(who, task["id"], choice="B")  # B is r1's answer in every task
    with db.session() as s:
        loop = loop_state.get_loop(s, "demo")
        chain = loop_state.lineage(s, loop, "r1")
        assert [step.policy.name for step in chain] == ["r1", "sft"]
        assert chain[0].reward_model is not None and chain[0].reward_model.n_votes == 4
        text = loop_state.format_lineage(chain)
        assert "reward_model=rm-r1 (votes 4" in text and "gold win rate vs SFT 0.700 [0.600, 0.800]" in text
        names, judgements = loop_judgements(s, loop)
        assert names == ["sft", "r1"]
        assert (
            sum(j.source == "votes" for j in judgements) == 3
            and sum(j.source == "eval" for j in judgements) == 10
        )
        assert all(j.outcome == 0.0 for j in judgements if j.source == "votes")  # b = r1 won each vote
        status = loop_state.status_text(s, loop)
    assert "round 1: phases reward,register; tasks 4, votes 3" in status
    assert "rm-r1 on 4 votes (gold accuracy 0.800)" in status
    assert status.index("\nr1 ") < status.index("\nsft ")  # r1 leads the leaderboard


def test_admin_loop_page_shows_rounds_versions_and_leaderboard(api, db: Database, make_client) -> None:
    register_versions(db)
    browser = make_client()
    log_in(browser, db, "root", role="admin")
    index = browser.get("/admin")
    assert 'href="/admin/loops/demo"' in index.text
    page = browser.get("/admin/loops/demo")
    assert page.status_code == 200
    rows = page.text.split('<table id="leaderboard">')[1].split("</table>")[0]
    assert rows.index('data-policy="r1"') < rows.index('data-policy="sft"')  # 7 wins of 10 against SFT
    assert '<td class="votes">4</td>' in page.text  # rm-r1 learned from 4 votes
    assert browser.get("/admin/loops/nope").status_code == 404


def test_the_leaderboard_leaves_out_answers_made_from_a_policys_answers(api, db: Database) -> None:
    """generate's short_k and other_k candidates carry their policy's name but are not its answers to the prompt:
    a vote on one does not rank the policies."""
    register_versions(db)
    rows = cross_version_rows(1, 3)
    rows[0]["completions"][2]["sampling"] = {"truncated": "first_sentence"}  # r1's answer cut short
    rows[1]["completions"][0]["sampling"] = {"answer_to": "p7"}  # sft's answer to another prompt
    api.post("admin", "/api/projects/demo/import", json={"candidates": rows})
    while (task := api.next("ann")) is not None:
        api.vote("ann", task["id"], choice="B")
    with db.session() as s:
        judgements = loop_judgements(s, loop_state.get_loop(s, "demo"))[1]
    # 6 tasks: both of prompt 0 and one of prompt 1 hold a made-up answer
    assert sum(j.source == "votes" for j in judgements) == 3


def test_status_and_lineage_say_when_a_rounds_policy_is_its_parents(db: Database) -> None:
    """docs/loop.md: a round whose PPO kept its starting policy says so in its line (the loop's own summary
    did; status and lineage did not)."""
    register_versions(db)
    with db.session() as s:
        r1 = s.scalars(select(PolicyVersion).where(PolicyVersion.name == "r1")).one()
        r1.metrics = {**r1.metrics, "unchanged": True}
        s.commit()
        loop = loop_state.get_loop(s, "demo")
        status = loop_state.status_text(s, loop)
        lineage = loop_state.format_lineage(loop_state.lineage(s, loop, "r1"))
    assert loop_state.UNCHANGED in status.splitlines()[1] and loop_state.UNCHANGED in lineage.splitlines()[0]
