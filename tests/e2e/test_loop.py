"""`rlhf loop` on tiny models, killed (SIGKILL) during generation, while waiting for votes and during PPO, then
started again: it finishes, makes as many tasks as a run never killed (no duplicates), keeps every vote
acknowledged before the kill, and does not run finished phases again."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from rlhf.feedback.db import Database
from rlhf.feedback.models import LoopPhase, Task, Vote
from tests.cli import run_cli

pytestmark = pytest.mark.slow

ROUNDS = 2
PAIRS_PER_ROUND = 12


def tiny_config(path: Path, sft: Path, data: Path, out: Path) -> Path:
    """Two rounds of 10 prompts, 12 comparisons each, 4 PPO iterations: a round in a few seconds."""
    config = {
        "generate": {"max_new_tokens": 12, "batch_size": 64, "precision": "fp32"},
        "panel": {"size": 3},
        "reward": {"batch_size": 8, "micro_batch_size": 8, "max_seq_len": 64, "eval_fraction": 0.1,
                   "save_every": 2, "log_every": 1, "precision": "fp32",
                   "normalise": {"n_prompts": 8, "max_new_tokens": 12}},
        "ppo": {"prompts_file": str(data / "rl_prompts.jsonl"), "iterations": 4, "batch_size": 8,
                "minibatch_size": 8, "micro_batch_size": 8, "max_new_tokens": 12, "save_every": 1,
                "log_every": 1, "precision": "fp32"},
        "eval": {"prompts_file": str(data / "eval_prompts.jsonl"), "n_prompts": 8, "max_new_tokens": 12,
                 "bootstrap": 50, "precision": "fp32"},
        "loop": {"out_dir": str(out), "name": "tiny", "sft_policy": str(sft),
                 "prompts_file": str(data / "rl_prompts.jsonl"), "rounds": ROUNDS, "prompts_per_round": 10,
                 "share_old_prompts": 0.2, "k": 3, "k_previous": 2, "pairs_per_round": PAIRS_PER_ROUND,
                 "ensemble_size": 3, "poll_s": 0.1},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, log: Path, stall: str | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RLHF_LOOP_STALL": stall or ""}
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-m", "rlhf.cli", "loop", "-c", str(config), "--quiet"],
                                stdout=f, stderr=subprocess.STDOUT, env=env)  # fmt: skip


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (
            f"the loop ended (rc {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def finish(config: Path, log: Path) -> str:
    """Run the loop again to the end, in this process (no second start-up); returns what this run logged."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("rlhf")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        proc = run_cli("loop", "-c", str(config), "--quiet")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = stream.getvalue() + proc.stderr
    with log.open("a") as f:
        f.write(text)
    assert proc.returncode == 0, text[-3000:]
    return text


def store(out: Path) -> dict[str, Any]:
    """Tasks, live votes (id -> choice) and finished phases (round, phase) -> finished_at, from the store."""
    db = Database(f"sqlite:///{out / 'feedback.db'}")
    try:
        with db.session() as session:
            return {
                "tasks": session.scalar(select(func.count(Task.id))),
                "votes": dict(session.execute(select(Vote.id, Vote.choice).where(Vote.retracted_at.is_(None))).all()),
                "phases": {(p.round, p.phase): p.finished_at for p in session.scalars(select(LoopPhase))},
            }  # fmt: skip
    finally:
        db.dispose()


@pytest.fixture
def setup(tmp_path: Path, tiny_sft_model: Path, demo_data: Path) -> tuple[Path, Path, Path]:
    out = tmp_path / "loop"
    return tiny_config(tmp_path / "loop.yaml", tiny_sft_model, demo_data, out), out, tmp_path / "loop.log"


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, tiny_sft_model: Path, demo_data: Path
) -> dict[str, Any]:
    """The store of a run never killed."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = tiny_config(root / "loop.yaml", tiny_sft_model, demo_data, root / "loop")
    finish(config, root / "loop.log")
    return {**store(root / "loop"), "config": config}


def test_uninterrupted_run_records_every_phase_and_the_lineage(uninterrupted: dict[str, Any]) -> None:
    assert uninterrupted["tasks"] == ROUNDS * PAIRS_PER_ROUND
    assert len(uninterrupted["votes"]) == uninterrupted["tasks"]  # overlap 1, every task answered
    phases = ["generate", "tasks", "votes", "reward", "ppo", "eval", "register"]
    assert set(uninterrupted["phases"]) == {(0, "register")} | {(r, p) for r in (1, 2) for p in phases}
    cli = ["loop", "-c", str(uninterrupted["config"])]
    lineage = run_cli(*cli, "lineage", "r2")
    assert lineage.returncode == 0, lineage.stderr
    lines = lineage.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["r2", "r1", "sft"]
    assert "reward_model=rm-r2 (votes 24, warm start from rm-r1)" in lines[0]
    assert "reward_model=rm-r1 (votes 12, warm start from SFT)" in lines[1]
    proc = run_cli(*cli, "status")
    assert proc.returncode == 0, proc.stderr
    status = proc.stdout
    assert f"round 2: phases {','.join(phases)}; tasks {PAIRS_PER_ROUND}, votes {PAIRS_PER_ROUND}" in status
    assert "(9 active, 3 random pairs)" in status  # round 2: active selection with a 25% random share
    board = status.split("leaderboard")[1].splitlines()[2:]
    assert sorted(line.split()[0] for line in board) == ["r1", "r2", "sft"]


def test_killed_during_generation(setup: tuple[Path, Path, Path], uninterrupted: dict[str, Any]) -> None:
    config, out, log = setup
    marker = out.parent / "stalled"
    proc = start(config, log, stall=f"r2.generate:{marker}")  # round 2: after the current policy's answers
    wait_for(marker.exists, proc, log)
    kill(proc)
    first = out / "round-2" / "candidates-r1.jsonl"
    mtime, before = first.stat().st_mtime_ns, store(out)
    assert (2, "generate") not in before["phases"] and (1, "register") in before["phases"]
    resumed = finish(config, log)
    after = store(out)
    assert after["tasks"] == uninterrupted["tasks"]
    assert first.stat().st_mtime_ns == mtime  # the finished policy's answers were not sampled again
    assert "round 1 already finished" in resumed
    assert all(after["phases"][k] == v for k, v in before["phases"].items())


def test_killed_while_waiting_for_votes(
    setup: tuple[Path, Path, Path], uninterrupted: dict[str, Any]
) -> None:
    config, out, log = setup
    cfg = yaml.safe_load(config.read_text())
    cfg["loop"]["panel_votes_per_poll"] = (
        6  # the panel (3) votes 6 at a time; the loop looks at the count between
    )
    config.write_text(yaml.safe_dump(cfg))
    marker = out.parent / "stalled"
    proc = start(config, log, stall=f"r1.votes:{marker}")
    wait_for(marker.exists, proc, log)
    kill(proc)
    before = store(out)
    assert len(before["votes"]) == 6 and before["tasks"] == PAIRS_PER_ROUND
    resumed = finish(config, log)
    after = store(out)
    assert after["tasks"] == uninterrupted["tasks"]
    assert len(after["votes"]) == len(uninterrupted["votes"])
    assert all(
        after["votes"].get(i) == choice for i, choice in before["votes"].items()
    )  # none lost or changed
    assert "round 1: tasks already finished, skipped" in resumed
    assert "round 1: generate already finished, skipped" in resumed


def test_killed_during_ppo(setup: tuple[Path, Path, Path], uninterrupted: dict[str, Any]) -> None:
    config, out, log = setup
    checkpoint = out / "round-1" / "ppo" / "checkpoints" / "step-0000002"
    proc = start(config, log)
    wait_for(checkpoint.exists, proc, log)
    kill(proc)
    before = store(out)
    assert (1, "reward") in before["phases"] and (1, "ppo") not in before["phases"]
    resumed = finish(config, log)
    after = store(out)
    assert after["tasks"] == uninterrupted["tasks"]
    assert len(after["votes"]) == len(uninterrupted["votes"])
    assert "ppo: resumed from" in resumed and "round 1: reward already finished, skipped" in resumed
    assert all(after["phases"][k] == v for k, v in before["phases"].items())
    steps = [
        json.loads(line)["step"]
        for line in (out / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]  # rows logged after the checkpoint were dropped, the rest logged once


def test_people_vote_in_a_running_labeling_app_and_the_loop_waits(tmp_path: Path, tiny_sft_model: Path,
                                                                    demo_data: Path) -> None:  # fmt: skip
    """No panel: the loop makes tasks in the store of a running labeling server and waits until people have
    cast min_votes through it; the reward model learns from exactly those votes."""
    from rlhf.feedback.client import FeedbackClient
    from rlhf.feedback.testing import make_user, run_server

    out = tmp_path / "loop"
    url = f"sqlite:///{tmp_path / 'team.db'}"
    config = tiny_config(tmp_path / "loop.yaml", tiny_sft_model, demo_data, out)
    cfg = yaml.safe_load(config.read_text())
    cfg["loop"].update(rounds=1, panel=False, min_votes=8, db=url, vote_timeout_s=120, undo_window_s=1)
    cfg["reward"].update(batch_size=4, micro_batch_size=4)  # 8 votes by one person make 5 groups
    config.write_text(yaml.safe_dump(cfg))
    token = make_user(url, "lia")
    log = tmp_path / "loop.log"
    with run_server(url) as base_url:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "loop", "-c", str(config), "--quiet",
                                 "--feedback-url", base_url], stdout=log.open("ab"), stderr=subprocess.STDOUT)  # fmt: skip
        person = FeedbackClient(base_url, token)
        wait_for(lambda: "waiting for 8 votes" in log.read_text(), proc, log)
        for n in range(8):
            task = person.next_task("tiny")
            assert task is not None
            person.vote(
                task["id"], choice="A", display_order=task["display_order"], idempotency_key=f"lia-vote-{n}"
            )
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        person.close()
    db = Database(url)
    try:
        with db.session() as session:
            from rlhf.feedback.loop_state import get_loop, reward_models

            (rm,) = reward_models(session, get_loop(session, "tiny"))
            assert rm.n_votes == 8 and len(rm.vote_ids) == 8
            assert set(session.scalars(select(Vote.source))) == {"api"}
    finally:
        db.dispose()


def test_too_few_votes_by_the_timeout_stops_the_loop_when_asked(setup: tuple[Path, Path, Path]) -> None:
    config, out, log = setup
    cfg = yaml.safe_load(config.read_text())
    cfg["loop"].update(panel=False, vote_timeout_s=0.5, on_timeout="stop")
    config.write_text(yaml.safe_dump(cfg))
    proc = run_cli("loop", "-c", str(config), "--quiet")
    assert proc.returncode == 1
    assert f"error: round 1: 0 of the {PAIRS_PER_ROUND} votes needed arrived within 0.5 s" in proc.stderr
    assert (1, "votes") not in store(out)["phases"] and (1, "tasks") in store(out)["phases"]


def test_online_dpo_rounds_train_without_a_reward_model(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path
) -> None:
    from rlhf.config import load_config
    from rlhf.stages import loop as stage

    out = tmp_path / "loop"
    config = tiny_config(tmp_path / "loop.yaml", tiny_sft_model, demo_data, out)
    cfg = load_config(config, ["loop.method=dpo", "dpo.batch_size=4", "dpo.micro_batch_size=4", "dpo.lr=1e-3",
                               "dpo.max_seq_len=64", "dpo.precision=fp32", "dpo.warmup_steps=0"])  # fmt: skip
    versions = stage.run(cfg, quiet=True)

    assert [v.name for v in versions] == ["sft", "r1", "r2"]
    assert [v.parent for v in versions[1:]] == ["sft", "r1"] and all(v.reward_model is None for v in versions)
    phases = ["generate", "tasks", "votes", "dpo", "eval", "register"]
    assert set(store(out)["phases"]) == {(0, "register")} | {(r, p) for r in (1, 2) for p in phases}
    for r in (1, 2):
        assert not (out / f"round-{r}" / "reward").exists()
        votes = [json.loads(line) for line in (out / f"round-{r}" / "votes.jsonl").read_text().splitlines()]
        assert votes and all(v["meta"]["prompt_id"].startswith(f"r{r}:") for v in votes)  # this round's only
        assert versions[r].metrics["reward_model_votes"] == len(votes)
    # round 2 starts from round 1's policy and its DPO run takes that policy as the reference
    r2 = yaml.safe_load((out / "round-2" / "dpo" / "config.yaml").read_text())
    assert r2["policy"] == versions[1].path and r2["reference"] is None
