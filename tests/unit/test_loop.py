"""rlhf/stages/loop.py helpers: each round's prompts are a pure function of (seed, round), new ones never repeat,
a share comes back from earlier rounds; candidate pairs leave identical answers out; the loop config loads;
a wrong SFT path fails before the store records it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from rlhf.config import load_config
from rlhf.errors import ConfigError, RlhfError
from rlhf.feedback.db import Database, upgrade
from rlhf.feedback.models import LoopRun, PolicyVersion, RewardModelVersion
from rlhf.feedback.schemas import CandidateRow
from rlhf.stages import loop
from rlhf.stages.loop import candidate_pairs, pending, round_ppo_config, round_prompts


def round_one_rows(n: int) -> list[CandidateRow]:
    """n candidate rows of round 1, two answers each."""
    return [CandidateRow.model_validate({"prompt": f"q{i}", "prompt_id": f"r1:p{i}", "completions": [
        {"text": "a", "policy": "sft"}, {"text": "b", "policy": "sft"}]}) for i in range(n)]  # fmt: skip


REPO = Path(__file__).resolve().parents[2]


def round_one_loop(db: Database, rows: list[CandidateRow], **import_options: int) -> LoopRun:
    """Loop "l" in the store, `rows` imported as the tasks of its first round."""
    from rlhf.feedback.importer import import_candidates
    from rlhf.feedback.loop_state import get_or_create_loop

    with db.session() as session:
        run = get_or_create_loop(session, "l", {})
        import_candidates(session, "l", rows, **import_options)
    return run


@contextmanager
def labeler_on_round_one(tmp_path: Path, n: int = 3) -> Iterator[tuple[Database, LoopRun, Any]]:
    """Loop "l" with `n` tasks in round 1, in a store served over HTTP, and a client of its labeler "ann"."""
    from rlhf.feedback.client import FeedbackClient
    from rlhf.feedback.testing import make_user, run_server

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    token = make_user(url, "ann")
    db = Database(url)
    try:
        loop_run = round_one_loop(db, round_one_rows(n))
        with run_server(url) as base, FeedbackClient(base, token) as client:
            yield db, loop_run, client
    finally:
        db.dispose()


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


def test_candidate_pairs_skip_identical_answers_and_repeated_pairs() -> None:
    """An answer two policies both gave makes one pair with each other answer, not two: the labeling app keeps
    one task for the same texts, and a selection of N pairs would make fewer than N tasks."""
    rows = [{"prompt": "q", "completions": [{"text": "a"}, {"text": "b"}, {"text": "a"}, {"text": "c"}]},
            {"prompt": "r", "completions": [{"text": "a"}, {"text": "b"}]}]  # fmt: skip
    assert candidate_pairs(rows) == [(0, 0, 1), (0, 0, 3), (0, 1, 3), (1, 0, 1)]


def test_pending_reads_the_finished_phases() -> None:
    done = {(1, "generate"): {}}
    assert not pending(done, 1, "generate") and pending(done, 1, "tasks") and pending(done, 2, "generate")


def test_demo_config_has_a_loop_section() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.loop.rounds == 3 and cfg.loop.sft_policy == "runs/demo/sft/final"
    # random comparisons: active selection left rounds 2 and 3 no better than round 1 (docs/loop.md)
    assert not cfg.loop.active and cfg.loop.pairs_per_round == 1200


def test_each_round_widens_the_kl_budget_and_loop_ppo_overrides_the_ppo_section(tmp_path: Path) -> None:
    cfg = load_config(None, ["ppo.lr=2e-4", "ppo.guard_every=10", "ppo.seed=5", "loop.kl_budget_step=0.7",
                             "loop.ppo={lr: 5.0e-5, guard_every: 1}", "loop.sft_policy=SFT"])  # fmt: skip
    current = PolicyVersion(name="r1", path="R1")
    configs = [round_ppo_config(cfg, current, RewardModelVersion(round=r, path=f"RM{r}"), tmp_path / str(r))
               for r in (1, 2, 3)]  # fmt: skip
    assert [c.kl_budget for c in configs] == pytest.approx([0.7, 1.4, 2.1])
    assert [c.seed for c in configs] == [6, 7, 8]
    first = configs[0]
    assert (first.lr, first.guard_every, first.policy, first.reference, first.reward_model) == (
        5e-5,
        1,
        "R1",
        "SFT",
        "RM1",
    )
    assert cfg.ppo.lr == 2e-4 and cfg.ppo.guard_every == 10  # `rlhf ppo` and the demo keep their own
    unchanged = load_config(None, ["ppo.kl_budget=3.0"])
    assert (
        round_ppo_config(unchanged, current, RewardModelVersion(round=2, path="RM"), tmp_path).kl_budget
        == 3.0
    )


def test_loop_ppo_lays_a_nested_section_over_the_ppo_sections_key_by_key() -> None:
    cfg = load_config(
        None, ["ppo.lora.alpha=32", "ppo.lora.target_modules=[q_proj]", "loop.ppo={lora: {r: 8}}"]
    )
    assert cfg.loop_ppo().lora.model_dump() == {"r": 8, "alpha": 32, "target_modules": ["q_proj"]}
    assert cfg.ppo.lora.r == 0
    flat = load_config(None, ["ppo.lora.alpha=32", "loop.ppo={lora_r: 4}"])  # the flat key PPO configs took
    assert (flat.loop_ppo().lora.r, flat.loop_ppo().lora.alpha) == (4, 32)


@pytest.mark.parametrize(
    ("override", "message"),
    [("loop.ppo={learning_rate: 1}", "not ppo settings: learning_rate"), ("loop.ppo={lr: -1}", "lr")],
)
def test_loop_ppo_takes_only_valid_ppo_settings(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_wrong_sft_policy_path_is_an_error_before_the_store_records_it(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(20)))
    cfg = load_config(None, [f"loop.out_dir={tmp_path / 'loop'}", f"loop.prompts_file={prompts}",
                             f"loop.sft_policy={tmp_path / 'no-such-sft'}", "loop.prompts_per_round=5"])  # fmt: skip
    with pytest.raises(RlhfError, match="no-such-sft: no such directory"):
        loop.run(cfg)
    # nothing registered: started again with the right path, the loop's SFT version is that path
    db = Database(loop.db_url(cfg))
    try:
        upgrade(db)
        with db.session() as session:
            assert session.scalar(select(func.count(PolicyVersion.id))) == 0
            assert session.scalar(select(func.count(LoopRun.id))) == 0
    finally:
        db.dispose()


def test_a_loop_started_again_with_other_settings_says_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'feedback.db'}")
    try:
        upgrade(db)
        with caplog.at_level("WARNING", logger="rlhf.stages.loop"), db.session() as session:
            loop.start_loop(session, load_config(None, ["loop.name=l", "loop.sft_policy=SFT"]))
            assert not caplog.records  # the first start
            loop.start_loop(session, load_config(None, ["loop.name=l", "loop.sft_policy=SFT", "loop.seed=5",
                                                        "ppo.lr=1e-4", "loop.rounds=9"]))  # fmt: skip
    finally:
        db.dispose()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "loop.seed 0 -> 5" in warning and "ppo.lr " in warning and "loop.rounds" not in warning


def test_a_resumed_round_trains_on_the_votes_it_exported_not_on_later_ones(tmp_path: Path) -> None:
    with labeler_on_round_one(tmp_path) as (db, loop_run, client):
        client.vote(client.next_task("l")["id"], choice="A")
        assert len(loop.round_votes(db, loop_run, tmp_path, undo_window_s=0)) == 1
        (tmp_path / "reward" / "checkpoints" / "step-0000001").mkdir(parents=True)  # its training saved one
        client.vote(
            client.next_task("l")["id"], choice="A"
        )  # cast while it trains; then killed, started again
        again = loop.round_votes(db, loop_run, tmp_path, undo_window_s=0)
    assert len(again) == 1 and len(list((tmp_path / "votes.jsonl").read_text().splitlines())) == 1


def test_a_round_whose_training_saved_nothing_exports_the_votes_again(tmp_path: Path) -> None:
    """A round whose reward training failed before its first checkpoint (one vote, reward.batch_size 4) kept
    that one vote in votes.jsonl, and failed the same way at every later start, however many people voted."""
    with labeler_on_round_one(tmp_path) as (db, loop_run, client):
        client.vote(client.next_task("l")["id"], choice="A")
        assert len(loop.round_votes(db, loop_run, tmp_path, undo_window_s=0)) == 1
        client.vote(client.next_task("l")["id"], choice="B")  # the loop is started again after this vote
        again = loop.round_votes(db, loop_run, tmp_path, undo_window_s=0)
    assert [r["choice"] for r in again] == ["A", "B"]
    assert len((tmp_path / "votes.jsonl").read_text().splitlines()) == 2


def test_a_round_without_a_comparison_writes_no_votes_file_and_a_later_start_trains_on_new_votes(
    tmp_path: Path,
) -> None:
    """A round that went on with no votes (loop.on_timeout = continue), or only ties, wrote an empty votes.jsonl
    once: the reward stage failed on it at every later start, whatever people voted since."""
    with labeler_on_round_one(tmp_path) as (db, loop_run, client):
        client.vote(client.next_task("l")["id"], choice="tie")
        with pytest.raises(RlhfError, match=r"none of the 1 votes .* compares two answers .* only ties"):
            loop.round_votes(db, loop_run, tmp_path, undo_window_s=0)
        assert not (tmp_path / "votes.jsonl").exists()
        client.vote(client.next_task("l")["id"], choice="A")
        votes = loop.round_votes(db, loop_run, tmp_path, undo_window_s=0)
    assert [r["choice"] for r in votes] == ["tie", "A"]


def test_a_round_waits_out_the_undo_window_and_never_trains_on_a_vote_that_may_be_taken_back(
    tmp_path: Path,
) -> None:
    """People may undo a vote for undo_window_s after casting it: a round whose count is reached by votes still
    inside that window waits, and exports only votes past it (the simulated panel's count at once)."""
    from rlhf.feedback.client import FeedbackClient
    from rlhf.feedback.testing import make_user, run_server

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    token = make_user(url, "ann")
    db = Database(url)
    rows = round_one_rows(3)
    settings = ["loop.name=l", "loop.panel=false", "loop.min_votes=2", "loop.vote_timeout_s=0.3",
                "loop.poll_s=0.05", "loop.on_timeout=stop"]  # fmt: skip
    try:
        loop_run = round_one_loop(db, rows)
        with run_server(url) as base, FeedbackClient(base, token) as client:
            for _ in range(2):
                client.vote(client.next_task("l")["id"], choice="A")
            with pytest.raises(
                loop.LoopStopped,
                match=r"0 of the 2 votes needed .* \(2 more cast, which may still be undone\)",
            ):
                loop.collect_votes(load_config(None, settings), db, loop_run, 1)
            with pytest.raises(
                RlhfError, match=r"^loop: now: none of the 0 votes that can no longer be undone"
            ):
                loop.round_votes(db, loop_run, tmp_path / "now", undo_window_s=60)
            client.undo()  # within the window: this vote is never trained on
            client.vote(client.next_task("l")["id"], choice="B", source="simulated")
            info = loop.collect_votes(load_config(None, [*settings, "loop.undo_window_s=0"]), db, loop_run, 1)
            assert info["votes"] == 2
            kept = loop.round_votes(db, loop_run, tmp_path / "later", undo_window_s=0)
            simulated = loop.round_votes(db, loop_run, tmp_path / "panel", undo_window_s=60)
    finally:
        db.dispose()
    assert [r["choice"] for r in kept] == ["A", "B"]
    assert [r["meta"]["source"] for r in simulated] == ["simulated"]


def test_the_round_line_names_what_the_votes_trained() -> None:
    from rlhf.cli.loop import round_line

    metrics = {"win_rate_vs_sft": 0.6875, "ci95": [0.4375, 0.875], "reward_model_votes": 40}
    ppo = PolicyVersion(
        loop_id=1, name="r1", round=1, parent="sft", reward_model="rm-r1", path="p", metrics=metrics
    )
    dpo = PolicyVersion(
        loop_id=1, name="r1", round=1, parent="sft", reward_model=None, path="p", metrics=metrics
    )
    assert round_line(ppo) == (
        "round 1: policy r1, gold win rate vs SFT 0.688 [0.438, 0.875], reward model trained on 40 votes"
    )
    assert round_line(dpo).endswith("[0.438, 0.875], online DPO on 40 votes")
    # the win rate is named after the judge that measured it, not always gold
    judged = PolicyVersion(loop_id=1, name="r1", round=1, parent="sft", reward_model="rm-r1", path="p",
                           metrics={**metrics, "judge": "reward_model"})  # fmt: skip
    assert round_line(judged).startswith("round 1: policy r1, reward_model win rate vs SFT 0.688")
    # a round whose PPO kept its starting policy says so: its win rate is its parent's, sampled again
    kept = PolicyVersion(loop_id=1, name="r1", round=1, parent="sft", reward_model="rm-r1", path="p",
                         metrics={**metrics, "unchanged": True})  # fmt: skip
    assert round_line(kept).endswith("40 votes; unchanged: PPO's guard found no iteration better than its start, "
                                     "so the policy is its parent's")  # fmt: skip


def test_loop_status_reads_a_store_and_never_makes_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rlhf.cli import app

    missing = tmp_path / "nothere.db"
    result = CliRunner().invoke(app, ["loop", "status", "--db", f"sqlite:///{missing}"])
    assert result.exit_code != 0 and not missing.exists()
    assert (
        str(result.exception) == f"no feedback store at sqlite:///{missing} (give the loop's store with --db)"
    )


def test_a_loop_resumed_with_another_overlap_waits_for_its_tasks_own(tmp_path: Path) -> None:
    """The round's tasks were imported with overlap 1; resumed with loop.overlap=2 the round waited for twice the
    votes the labeling app would ever hand out, until its timeout."""

    db = Database(f"sqlite:///{tmp_path / 'feedback.db'}")
    upgrade(db)
    rows = round_one_rows(3)
    settings = ["loop.name=l", "loop.panel=false", "loop.vote_timeout_s=0.2", "loop.poll_s=0.05",
                "loop.on_timeout=stop", "loop.overlap=2"]  # fmt: skip
    try:
        loop_run = round_one_loop(db, rows, overlap=1)
        with pytest.raises(loop.LoopStopped, match="0 of the 3 votes needed"):
            loop.collect_votes(load_config(None, settings), db, loop_run, 1)
    finally:
        db.dispose()


def test_a_loop_keeps_the_size_of_its_rounds(tmp_path: Path) -> None:
    """Each round's prompts follow the earlier rounds' at prompts_per_round a round: resumed with another size,
    round 3 drew prompts rounds 1 and 2 had asked (or skipped some for good), under a warning alone."""
    from rlhf.feedback.loop_state import get_or_create_loop

    db = Database(f"sqlite:///{tmp_path / 'feedback.db'}")
    upgrade(db)
    first = load_config(None, ["loop.name=l", "loop.prompts_per_round=20"]).model_dump(mode="json")
    try:
        with db.session() as session:
            loop_run = get_or_create_loop(session, "l", first)
            loop.log_changed_settings(
                loop_run, first | {"loop": {**first["loop"], "rounds": 9}}
            )  # more rounds: fine
            with pytest.raises(
                RlhfError, match=r"loop l: loop.prompts_per_round 20 -> 6: the rounds' prompts"
            ):
                loop.log_changed_settings(
                    loop_run, first | {"loop": {**first["loop"], "prompts_per_round": 6}}
                )
    finally:
        db.dispose()


def test_a_feedback_url_of_another_store_is_said_in_one_line(tmp_path: Path) -> None:
    """The panel's tokens are made in the loop's store: a labeling server of another store answered 401, and
    the loop stopped on "labeling API answered 401: not authenticated"."""
    from rlhf.feedback.testing import run_server

    db = Database(f"sqlite:///{tmp_path / 'loop.db'}")
    upgrade(db)
    other = Database(f"sqlite:///{tmp_path / 'other.db'}")
    upgrade(other)
    other.dispose()
    rows = round_one_rows(1)
    try:
        loop_run = round_one_loop(db, rows)
        with run_server(f"sqlite:///{tmp_path / 'other.db'}") as base:
            settings = ["loop.name=l", f"loop.feedback_url={base}", "loop.vote_timeout_s=5"]
            with pytest.raises(
                RlhfError, match=f"the labeling server at {base} does not know the loop panel's"
            ):
                loop.collect_votes(load_config(None, settings), db, loop_run, 1)
    finally:
        db.dispose()


def test_a_loop_refuses_a_prompts_file_other_than_the_one_its_rounds_drew_from(tmp_path: Path) -> None:
    """Prompts added to the file between rounds reshuffled its order: round 3 asked prompts round 2 had asked,
    and some were never reached, with no word."""
    from rlhf.feedback.loop_state import finish_phase, get_or_create_loop

    pool = [{"prompt": f"User: question {i}?\nAssistant:", "prompt_id": f"q{i}"} for i in range(40)]
    db = Database(f"sqlite:///{tmp_path / 'feedback.db'}")
    try:
        upgrade(db)
        with db.session() as session:
            run = get_or_create_loop(session, "l", {})
            loop.check_same_pool(
                session, run, loop.prompts_digest(pool), "p.jsonl"
            )  # before round 1: anything
            finish_phase(session, run, 1, "generate", {"pool": loop.prompts_digest(pool)})
            loop.check_same_pool(session, run, loop.prompts_digest(pool), "p.jsonl")  # the same file
            grown = pool + [{"prompt": "User: one more?\nAssistant:", "prompt_id": "q40"}]
            with pytest.raises(
                RlhfError,
                match=r"p.jsonl is not the file its rounds began drawing from \(40 prompts then, 41 now\)",
            ):
                loop.check_same_pool(session, run, loop.prompts_digest(grown), "p.jsonl")
            reordered = pool[::-1]
            with pytest.raises(RlhfError, match=r"\(40 prompts then, 40 now\)"):
                loop.check_same_pool(session, run, loop.prompts_digest(reordered), "p.jsonl")
    finally:
        db.dispose()


def test_an_unreachable_store_or_labeling_server_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ended in tracebacks of 80 and 146 lines (httpx's, SQLAlchemy's)."""
    from functools import partialmethod

    from rlhf.feedback.client import FeedbackClient

    monkeypatch.setattr(
        FeedbackClient, "__init__", partialmethod(FeedbackClient.__init__, retries=0)
    )  # no backoff

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "User: Hi!\\nAssistant:"}\n')
    cfg = load_config(None, ["loop.name=l", f"loop.sft_policy={tmp_path}", f"loop.prompts_file={prompts}",
                             "loop.db=postgresql://127.0.0.1:9/none", f"loop.out_dir={tmp_path / 'out'}"])  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"^cannot open the database postgresql\+psycopg://127.0.0.1:9/none: "
    ):
        loop.run(cfg, quiet=True)
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    db = Database(url)
    try:
        upgrade(db)
        run = round_one_loop(db, round_one_rows(3))
        settings = [
            "loop.name=l",
            "loop.panel=true",
            "loop.feedback_url=http://127.0.0.1:9",
            "loop.vote_timeout_s=5",
        ]
        with pytest.raises(
            RlhfError, match=r"^the labeling server at http://127.0.0.1:9\S* did not answer: "
        ):
            loop.collect_votes(load_config(None, settings), db, run, 1)
    finally:
        db.dispose()


def test_a_second_loop_in_the_same_folder_is_one_line(tmp_path: Path) -> None:
    """Two `rlhf loop` processes of one loop: the second died in a UniqueViolation traceback, or both trained
    into the same round folders."""
    import fcntl

    cfg = load_config(None, ["loop.name=l", f"loop.out_dir={tmp_path}"])
    with (tmp_path / ".loop.lock").open("a") as held:  # the first process's
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RlhfError, match=r"^loop l: another `rlhf loop` is running in "):
            loop.run(cfg, quiet=True)


def test_a_judge_that_is_no_reward_model_is_refused_before_round_one(
    tmp_path: Path, tiny_sft_model: Path
) -> None:
    """It was refused at the first round's eval phase, after the round's reward model and PPO had trained."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "User: Hi!\\nAssistant:"}\n')
    cfg = load_config(None, ["loop.name=l", f"loop.sft_policy={tiny_sft_model}", f"loop.prompts_file={prompts}",
                             f"loop.db=sqlite:///{tmp_path / 'f.db'}", f"loop.out_dir={tmp_path / 'out'}",
                             "eval.judge=reward_model", f"eval.judge_model={tiny_sft_model}"])  # fmt: skip
    with pytest.raises(RlhfError, match=r"is not a reward model \(LlamaForCausalLM\)"):
        loop.run(cfg, quiet=True)
    assert not (tmp_path / "f.db").exists()


def test_the_panel_on_prompts_of_another_world_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The simulated panel votes by the demo world's gold utility: on one's own prompts it voted without a word."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "User: How do I boil an egg?\\nAssistant:"}\n')
    cfg = load_config(None, ["loop.name=l", f"loop.sft_policy={tmp_path}", f"loop.prompts_file={prompts}",
                             "loop.panel=true", "loop.db=postgresql://127.0.0.1:9/none"])  # fmt: skip
    with caplog.at_level("WARNING", logger="rlhf.stages.loop"), pytest.raises(ConfigError):
        loop.run(
            cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"out_dir": str(tmp_path / "o")})}),
            quiet=True,
        )
    assert "the simulated panel votes by the demo world's gold utility" in caplog.text


def production_votes(url: str) -> None:
    """Two A/B pairs of the model server's production project with their users' votes: a completion prompt
    (the plain `rlhf serve` kind) and a chat through `rlhf gateway` (its conversation in meta)."""
    from rlhf.feedback.export import PROMPT_MESSAGES
    from rlhf.serve import feedback as ab

    store = ab.FeedbackStore(url, "production", 60)
    try:
        plain = (ab.Answer(" Paris.", "r1@abc", {}), ab.Answer(" Lyon.", "r1@abc", {}))
        assert ab.save_ab_pair(store, "ab-1", "User: Capital of France?\nAssistant:", plain, {})
        chat = (ab.Answer("Hello there.", "r1@abc", {}), ab.Answer("Go away.", "r1@abc", {}))
        messages = [{"role": "user", "content": "Hello!"}]
        assert ab.save_ab_pair(store, "ab-2", "user: Hello!", chat, {PROMPT_MESSAGES: messages})
        ab.record_ab_vote(store, "ab-1", store.token("ab-1"), "A", "vote-key-1")
        ab.record_ab_vote(store, "ab-2", store.token("ab-2"), "A", "vote-key-2")
    finally:
        store.close()


def test_production_votes_train_each_rounds_reward_model_with_loop_extra_projects(
    tmp_path: Path, tiny_sft_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/serving.md called production A/B votes what the loop's next round trains on, while the reward phase
    exported the loop's own project alone and no setting added another."""
    from rlhf.feedback.client import FeedbackClient
    from rlhf.feedback.loop_state import finish_phase, status_text
    from rlhf.feedback.testing import make_user, run_server
    from rlhf.models.loading import load_tokenizer
    from rlhf.stages import reward
    from rlhf.stages.reward import read_groups

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    token = make_user(url, "ann")
    production_votes(url)
    db = Database(url)
    read: dict[str, list[str]] = {}

    def fake_reward_run(rm_cfg: Any, resume: bool, quiet: bool) -> dict[str, Any]:
        groups = read_groups(rm_cfg.train_file, rm_cfg, load_tokenizer(str(tiny_sft_model)))
        read[rm_cfg.out_dir] = [g.prompt for g in groups]
        return {"rm/accuracy": 1.0}

    monkeypatch.setattr(reward, "run", fake_reward_run)
    settings = ["loop.name=l", "loop.undo_window_s=0", "reward.gold_eval=false"]
    try:
        loop_run = round_one_loop(db, round_one_rows(3))
        with run_server(url) as base, FeedbackClient(base, token) as client:
            client.vote(client.next_task("l")["id"], choice="A")
        with_production = load_config(None, [*settings, "loop.extra_projects=[production]"])
        rm = loop.train_reward(with_production, db, loop_run, 1, tmp_path / "on", None, quiet=True)
        alone = loop.train_reward(
            load_config(None, settings), db, loop_run, 1, tmp_path / "off", None, quiet=True
        )
        # a resumed round reads its file again: the same votes, counted the same way
        again = loop.train_reward(with_production, db, loop_run, 1, tmp_path / "on", None, quiet=True)
        with db.session() as session:
            finish_phase(session, loop_run, 1, "reward", {}, [rm])
            status = status_text(session, loop_run)
    finally:
        db.dispose()
    exported = [json.loads(line) for line in (tmp_path / "on" / "votes.jsonl").read_text().splitlines()]
    assert [(r["meta"]["project"], r["meta"]["source"]) for r in exported] == [
        ("l", "api"), ("production", "production"), ("production", "production")]  # fmt: skip
    assert (rm.n_votes, rm.metrics["votes/l"], rm.metrics["votes/production"]) == (3, 1, 2)
    assert len(rm.vote_ids) == 3 and again.metrics == rm.metrics and again.vote_ids == rm.vote_ids
    assert (alone.n_votes, alone.metrics["votes/l"], "votes/production" in alone.metrics) == (1, 1, False)
    assert "; rm-r1 on 3 votes (2 of project production)" in status
    # the gateway's chat reaches the reward model through the chat template, as the policy saw it
    assert read[str(tmp_path / "on" / "reward")] == [
        "q0", "User: Capital of France?\nAssistant:", "User: Hello!\nAssistant:"]  # fmt: skip
    assert read[str(tmp_path / "off" / "reward")] == ["q0"]


def test_a_project_of_loop_extra_projects_the_store_lacks_is_one_line_before_round_one(
    tmp_path: Path,
) -> None:
    production_votes(f"sqlite:///{tmp_path / 'feedback.db'}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "User: Hi!\\nAssistant:"}\n')
    cfg = load_config(None, ["loop.name=l", f"loop.sft_policy={tmp_path}", f"loop.prompts_file={prompts}",
                             "loop.panel=false", "loop.extra_projects=[production, prodution]",
                             f"loop.db=sqlite:///{tmp_path / 'feedback.db'}", f"loop.out_dir={tmp_path / 'out'}"])  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"^loop.extra_projects: the feedback store holds no project 'prodution' \(it holds production\)$",
    ):
        loop.run(cfg, quiet=True)
    db = Database(loop.db_url(cfg))
    try:
        with db.session() as session:
            assert session.scalar(select(func.count(LoopRun.id))) == 0
    finally:
        db.dispose()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["loop.extra_projects=[production]", "loop.method=dpo"], "loop.method dpo has none"),
        (["loop.name=l", "loop.extra_projects=[l]"], "not the loop's own \\('l'\\)"),
        (["loop.extra_projects=[production, production]"], "each project once"),
    ],
)
def test_loop_extra_projects_train_a_reward_model_of_other_projects(
    settings: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, settings)
