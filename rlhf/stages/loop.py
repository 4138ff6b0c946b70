"""`rlhf loop`: iterative refinement. Each round the current policy's answers go to people (or the simulated
panel), the reward model is retrained on every vote so far, and PPO trains the policy again.

One round r, phase by phase; each phase is recorded as finished in the feedback store (loop_phases) in the
same transaction as what it produced, and a restarted loop skips the finished ones:
  1. generate   sample this round's prompts (new ones and a share of earlier ones, fixed by (seed, r)); K answers
                each from the current policy and, for cross-version pairs, some from the previous version
  2. tasks      choose the pairs people see (active selection where bootstrap reward heads disagree most, plus
                a random share) and import them as comparison tasks; prompt ids "r{r}:..." make a second
                import of the same round create nothing
  3. votes      the simulated panel votes through the labeling API (as people do in the web app); wait until
                `min_votes` of this round's tasks are answered, or the timeout
  4. reward     retrain the reward model on all votes so far (with those of loop.extra_projects, such as
                the production A/B votes of `rlhf serve`), warm-started from the previous one
  5. ppo        PPO from the current policy against the new reward model, KL to the fixed SFT reference
     (or, with loop.method = dpo, phases 4-5 are one phase "dpo": online DPO of the current policy on this
     round's votes, with itself as the reference, and no reward model: the loop's cheaper variant)
  6. eval       the new policy against the SFT policy under the judge (win rate, 95% CI)
  7. register   the new policy version, with its parent, reward model and metrics

Training phases resume from their checkpoints (RUN/checkpoints), generation writes each policy's answers
atomically, votes carry idempotency keys: killed at any point and started again, the loop never duplicates a
task and never loses a vote. `rlhf loop status` and `rlhf loop lineage` read the store alone.

Layout of OUT (loop.out_dir): feedback.db (unless loop.db names another store), round-N/{prompts.jsonl,
candidates-VERSION.jsonl, candidates.jsonl, votes.jsonl, reward/, ppo/, eval.json}.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf.config import PPOConfig, RootConfig
from rlhf.data.jsonl import iter_jsonl, write_json, write_jsonl
from rlhf.data.preference_io import record_from_json
from rlhf.data.preferences import to_groups
from rlhf.errors import ConfigError, RlhfError
from rlhf.feedback.db import Database, open_database
from rlhf.feedback.loop_state import (
    UNCHANGED,
    finish_phase,
    finished_phases,
    get_or_create_loop,
    policies,
    reward_models,
    round_counts,
    round_prefix,
)
from rlhf.feedback.models import LoopRun, PolicyVersion, Project, RewardModelVersion

log = logging.getLogger(__name__)

SFT = "sft"
STALL_ENV = (
    "RLHF_LOOP_STALL"  # fault injection for the kill-and-resume tests: "rROUND.POINT:FILE" stalls there
)


class LoopStopped(RlhfError):
    """The loop stopped on purpose (too few votes by the timeout, with loop.on_timeout = stop)."""


def stall_point(name: str) -> None:
    """If RLHF_LOOP_STALL names this point, write its marker file and wait to be killed (tests only)."""
    point, _, marker = os.environ.get(STALL_ENV, "").partition(":")
    if point == name:
        Path(marker).write_text(name)
        while True:
            time.sleep(1)


def pending(done: dict[tuple[int, str], Any], round_: int, phase: str) -> bool:
    """Whether `phase` of `round_` still has to run (logs the skip otherwise)."""
    if (round_, phase) in done:
        log.info("loop: round %d: %s already finished, skipped", round_, phase)
        return False
    return True


def db_url(cfg: RootConfig) -> str:
    return cfg.loop.db or f"sqlite:///{Path(cfg.loop.out_dir) / 'feedback.db'}"


# --- 1. generate -----------------------------------------------------------------------------------------------


def round_prompts(pool: list[dict[str, Any]], round_: int, cfg: RootConfig) -> list[dict[str, Any]]:
    """This round's prompts, a pure function of (seed, round): the next unused ones of the shuffled pool, plus
    `share_old_prompts` of them drawn again from earlier rounds' new prompts."""
    lc = cfg.loop
    order = list(range(len(pool)))
    random.Random(lc.seed).shuffle(order)
    n_old = [0] + [round(lc.prompts_per_round * lc.share_old_prompts) for _ in range(1, round_)]
    n_new = [lc.prompts_per_round - n for n in n_old]
    start = sum(n_new[:-1])
    if start + n_new[-1] > len(pool):
        raise RlhfError(f"{lc.prompts_file}: {len(pool)} prompts are too few for round {round_}")
    new = order[start : start + n_new[-1]]
    old = random.Random(f"{lc.seed}-{round_}").sample(order[:start], min(n_old[-1], start))
    return [pool[i] for i in sorted(new + old)]


def prompts_digest(pool: list[dict[str, Any]]) -> dict[str, Any]:
    """What identifies the prompts file the rounds draw from: its size and a digest of its rows in order."""
    digest = hashlib.sha256(json.dumps(pool, sort_keys=True).encode()).hexdigest()[:16]
    return {"prompts": len(pool), "sha256": digest}


def check_same_pool(session: Session, loop: LoopRun, pool_digest: dict[str, Any], prompts_file: str) -> None:
    """Refuse a prompts file other than the one the loop's first round drew from (`prompts_digest`)."""
    drawn = finished_phases(session, loop).get((1, "generate"), {}).get("pool")
    if drawn is not None and drawn != pool_digest:  # loops begun before this check recorded none
        raise RlhfError(f"loop {loop.name}: {prompts_file} is not the file its rounds began drawing from "
                        f"({drawn['prompts']} prompts then, {pool_digest['prompts']} now): the rounds take their "
                        "prompts in turn from one shuffled order of it, so another file would ask prompts again "
                        "and skip others; keep it as it was, or start a loop of another loop.name")  # fmt: skip


def generate_candidates(
    cfg: RootConfig, round_: int, rdir: Path, sources: list[tuple[PolicyVersion, int]]
) -> dict[str, Any]:
    """Each source policy answers the round's prompts (its own atomic file, skipped when present); the answers
    are merged per prompt into candidates.jsonl, the current policy's first."""
    from rlhf.stages import generate

    by_prompt: dict[str, dict[str, Any]] = {}
    for n, (version, k) in enumerate(sources):
        out = rdir / f"candidates-{version.name}.jsonl"
        if not out.exists():
            # each round's policy is a checkpoint of this run, which no engine serves: sampled here
            gen_cfg = cfg.generate.model_copy(update={
                "model": version.path, "prompts_file": str(rdir / "prompts.jsonl"), "out": str(out),
                "policy_version": version.name, "k": k, "max_prompts": 0, "endpoint": None,
                "seed": cfg.loop.seed * 100_003 + round_ * 101 + n,
            })  # fmt: skip
            generate.run(gen_cfg)
        stall_point(f"r{round_}.generate")
        for _, row in iter_jsonl(out):
            merged = by_prompt.setdefault(row["prompt_id"], {**row, "completions": []})
            merged["completions"].extend(row["completions"])
    rows = list(by_prompt.values())
    write_jsonl(rdir / "candidates.jsonl", rows)
    return {"prompts": len(rows), "completions": sum(len(r["completions"]) for r in rows),
            "sources": [v.name for v, _ in sources]}  # fmt: skip


# --- 2. tasks ----------------------------------------------------------------------------------------------------


def candidate_pairs(rows: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """Every pair of distinct answers to each prompt, each pair of texts once: (row index, i, j). Two policies
    give the same answer often (the current one and its parent): as two pairs of the same texts, a selection
    would spend two of its comparisons on one task, which the labeling app keeps once."""
    pairs: list[tuple[int, int, int]] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    for p, row in enumerate(rows):
        texts = [c["text"] for c in row["completions"]]
        for i, j in itertools.combinations(range(len(texts)), 2):
            key = (row["prompt"], frozenset((texts[i], texts[j])))
            if texts[i] != texts[j] and key not in seen:
                seen.add(key)
                pairs.append((p, i, j))
    return pairs


def disagreement_scores(
    cfg: RootConfig, reward_model: str, rows: list[dict[str, Any]], pairs: list[tuple[int, int, int]],
    votes: list[dict[str, Any]], seed: int,
) -> list[float]:  # fmt: skip
    """Std over bootstrap heads of P(a > b) for each candidate pair (see rlhf.active)."""
    import torch

    from rlhf.active import disagreement, fit_bootstrap_heads, last_token_features
    from rlhf.models.heads import load_scalar_model
    from rlhf.models.loading import load_tokenizer

    decided = [v for v in votes if v["choice"] in ("A", "B")]
    texts = sorted(
        {(r["prompt"], c["text"]) for r in rows for c in r["completions"]}
        | {(v["prompt"], v[key]) for v in decided for key in ("completion_a", "completion_b")}
    )
    index = {t: n for n, t in enumerate(texts)}
    feats = last_token_features(load_scalar_model(reward_model), load_tokenizer(reward_model), texts,
                                max_len=cfg.reward.max_seq_len)  # fmt: skip
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)  # (N, d) standardised
    win = [(v["completion_a"], v["completion_b"]) if v["choice"] == "A" else (v["completion_b"], v["completion_a"])
           for v in decided]  # fmt: skip
    chosen = torch.tensor([index[(v["prompt"], w)] for v, (w, _) in zip(decided, win, strict=True)])
    rejected = torch.tensor([index[(v["prompt"], r)] for v, (_, r) in zip(decided, win, strict=True)])
    diffs = feats[chosen] - feats[rejected]  # (P, d)
    heads = fit_bootstrap_heads(diffs, cfg.loop.ensemble_size, seed, l2=cfg.loop.ensemble_l2)  # (H, d)
    a = torch.tensor([index[(rows[p]["prompt"], rows[p]["completions"][i]["text"])] for p, i, _ in pairs])
    b = torch.tensor([index[(rows[p]["prompt"], rows[p]["completions"][j]["text"])] for p, _, j in pairs])
    return disagreement(heads, feats[a], feats[b]).tolist()


def make_tasks(cfg: RootConfig, db: Database, loop: LoopRun, round_: int, rdir: Path) -> dict[str, Any]:
    """Choose the round's pairs and import them; a second call for the same round imports nothing new."""
    from rlhf.active import select_pairs
    from rlhf.feedback.export import export_records
    from rlhf.feedback.importer import import_candidates
    from rlhf.feedback.schemas import CandidateRow

    rows = [row for _, row in iter_jsonl(rdir / "candidates.jsonl")]
    pairs = candidate_pairs(rows)
    with db.session() as session:
        rms = reward_models(session, loop)
        votes = export_records(session, loop.name, "votes") if rms else []
    scores = None
    if cfg.loop.active and rms and votes:
        scores = disagreement_scores(cfg, rms[-1].path, rows, pairs, votes, cfg.loop.seed + round_)
    chosen = select_pairs(
        pairs, scores, cfg.loop.pairs_per_round, cfg.loop.random_share, cfg.loop.seed + round_
    )
    candidates = [
        CandidateRow.model_validate({
            **rows[p], "prompt_id": f"{round_prefix(round_)}{rows[p]['prompt_id']}", "pairs": sel.pairs,
            "meta": {**rows[p].get("meta", {}), "round": round_, "selection": sel.how},
        })
        for p, sel in chosen.items()
    ]  # fmt: skip
    with db.session() as session:
        imported = import_candidates(
            session, loop.name, candidates, task_kind="pairwise", overlap=cfg.loop.overlap
        )
    n_random = sum(len(s.pairs) for s in chosen.values() if s.how == "random")
    return {"tasks_created": imported.tasks, "skipped_prompts": imported.skipped, "random_pairs": n_random,
            "active_pairs": sum(len(s.pairs) for s in chosen.values()) - n_random,
            "selection": "active" if scores is not None else "random"}  # fmt: skip


# --- 3. votes ----------------------------------------------------------------------------------------------------


@contextmanager
def labeling_server(cfg: RootConfig, url: str) -> Iterator[str]:
    """The labeling app to vote through: `loop.feedback_url`, or the app served in this process."""
    from rlhf.feedback.testing import run_server

    if cfg.loop.feedback_url:
        yield cfg.loop.feedback_url.rstrip("/")
        return
    with run_server(url, votes_per_minute=0) as base_url:
        yield base_url


def collect_votes(cfg: RootConfig, db: Database, loop: LoopRun, round_: int) -> dict[str, Any]:
    """Let the panel vote (if on), then poll the store until the round has min_votes or the timeout passes."""
    import httpx

    from rlhf.feedback.client import FeedbackAPIError
    from rlhf.labelers.api_panel import label_through_api, panel_tokens
    from rlhf.labelers.panel import Panel

    lc = cfg.loop
    with db.session() as session:
        tasks, votes = round_counts(session, loop.name, round_, settled_before(lc.undo_window_s))
        cast_so_far = round_counts(session, loop.name, round_)[1]
        # the overlap the round's tasks were imported with (a loop resumed with another gets it from the next)
        overlap = session.scalar(select(Project.overlap).where(Project.name == loop.name)) or lc.overlap
    need = min(lc.min_votes, tasks * overlap) if lc.min_votes else tasks * overlap
    panel = Panel.from_config(cfg.panel) if lc.panel else None
    tokens = panel_tokens(db, panel, "loop panel") if panel else {}
    deadline = time.monotonic() + lc.vote_timeout_s
    log.info("loop: round %d: waiting for %d votes on %d tasks (%d so far, and %d within the undo window)",
             round_, need, tasks, votes, cast_so_far - votes)  # fmt: skip
    settling = False
    with labeling_server(cfg, db.url) if panel else nullcontext(None) as base_url:
        while True:
            cast = 0
            if panel is not None and base_url is not None:
                try:
                    cast = sum(
                        label_through_api(
                            base_url, tokens, panel, loop.name, lc.panel_votes_per_poll
                        ).values()
                    )
                except httpx.TransportError as e:  # the labeling server is not there (loop.feedback_url)
                    raise RlhfError(f"the labeling server at {base_url} did not answer: {type(e).__name__}: "
                                    f"{e}") from None  # fmt: skip
                except FeedbackAPIError as e:
                    if e.status != 401 or not lc.feedback_url:
                        raise
                    # the panel's tokens are made in the loop's store (--db): a server of another store knows none
                    raise RlhfError(f"the labeling server at {lc.feedback_url} does not know the loop panel's "
                                    f"tokens: it serves another store than the loop's "
                                    f"({db.engine.url.render_as_string(hide_password=True)})") from None  # fmt: skip
            with db.session() as session:
                live = round_counts(session, loop.name, round_)[1]
                votes = round_counts(session, loop.name, round_, settled_before(lc.undo_window_s))[1]
            if votes >= need:
                break
            if live >= need and not settling:  # the last votes may still be undone: wait out the undo window
                log.info("loop: round %d: %d votes, waiting up to %g s until they can no longer be undone",
                         round_, live, lc.undo_window_s)  # fmt: skip
                settling = True
            stall_point(f"r{round_}.votes")
            if time.monotonic() > deadline:
                message = f"round {round_}: {votes} of the {need} votes needed arrived within {lc.vote_timeout_s:g} s"
                if live > votes:  # cast, but still within the labeling app's undo window
                    message += f" ({live - votes} more cast, which may still be undone)"
                if lc.on_timeout == "stop":
                    raise LoopStopped(message + " (loop.on_timeout = stop)")
                log.warning(
                    "loop: %s; training on the votes that arrived (loop.on_timeout = continue)", message
                )
                break
            if not cast:
                time.sleep(lc.poll_s)
    return {"tasks": tasks, "votes": votes, "needed": need}


# --- 4. reward, 5. ppo, 6. eval ------------------------------------------------------------------------------


def settled_before(undo_window_s: float) -> datetime:
    """Votes cast before this moment can no longer be undone in the labeling app."""
    return datetime.now(timezone.utc) - timedelta(seconds=undo_window_s)


def round_votes(
    db: Database, loop: LoopRun, rdir: Path, undo_window_s: float, only_round: int | None = None,
    extra_projects: Sequence[str] = (), run: str = "reward",
) -> list[dict[str, Any]]:  # fmt: skip
    """The live votes so far (of `only_round`'s tasks only, if given) that can no longer be undone (see
    `settled`), the loop's own and then those of `extra_projects` (loop.extra_projects: production A/B votes),
    each marked with its project in meta, exported to round-N/votes.jsonl: a resumed round whose training run
    (round-N/`run`) has saved a checkpoint trains on that file again, not on votes people cast since, which its
    checkpoints never saw. A vote still in its undo window waits for the next round's export, so no vote its
    labeler takes back is trained on."""
    from rlhf.feedback.export import export_records

    path = rdir / "votes.jsonl"
    # before its first checkpoint (training failed on too few votes, or was killed early) the round exports
    # again: a file kept then would hold the round to those votes, however many people cast since
    if path.exists() and (
        any((rdir / run / "checkpoints").glob("step-*")) or (rdir / run / "final").exists()
    ):
        records = [row for _, row in iter_jsonl(path)]
        log_vote_counts(rdir, loop, records)
        return records
    before = settled_before(undo_window_s)

    def wanted(meta: dict[str, Any]) -> bool:
        in_round = only_round is None or str(meta["prompt_id"]).startswith(round_prefix(only_round))
        return in_round and (
            meta["source"] == "simulated" or datetime.fromisoformat(meta["created_at"]) <= before
        )

    records = []
    with db.session() as session:
        for project in (loop.name, *extra_projects):
            exported = [r for r in export_records(session, project, "votes") if wanted(r["meta"])]
            records.extend({**r, "meta": {**r["meta"], "project": project}} for r in exported)
    log_vote_counts(rdir, loop, records)
    if not any(g.pairs for g in to_groups(record_from_json(r) for r in records)):
        # not written: a file without a comparison would stop this round's training at every later start
        raise RlhfError(f"loop: {rdir.name}: none of the {len(records)} votes that can no longer "
                        "be undone compares two answers (no votes yet, or only ties and both_bad): nothing to "
                        "train on; let people vote, then start the loop again")  # fmt: skip
    write_jsonl(path, records)
    return records


def votes_by_project(loop: LoopRun, records: list[dict[str, Any]]) -> dict[str, int]:
    """How many of `records` each project gave (a votes file written before records named theirs: the loop's)."""
    counts = collections.Counter(str(r["meta"].get("project", loop.name)) for r in records)
    return {loop.name: counts.pop(loop.name, 0), **counts}


def log_vote_counts(rdir: Path, loop: LoopRun, records: list[dict[str, Any]]) -> None:
    counts = votes_by_project(loop, records)
    log.info("loop: %s: %d votes to train on (%s)", rdir.name, len(records),
             ", ".join(f"{n} of project {p}" for p, n in counts.items()))  # fmt: skip


def train_reward(
    cfg: RootConfig, db: Database, loop: LoopRun, round_: int, rdir: Path, parent: RewardModelVersion | None,
    quiet: bool,
) -> RewardModelVersion:  # fmt: skip
    """Every vote so far (the loop's, and loop.extra_projects') -> a reward model, warm-started from the previous
    round's; its metrics count the votes of each project (`votes/PROJECT`)."""
    from rlhf.stages import reward

    records = round_votes(db, loop, rdir, cfg.loop.undo_window_s, extra_projects=cfg.loop.extra_projects)
    warm = parent.path if parent is not None and cfg.loop.warm_start else None
    rm_cfg = cfg.reward.model_copy(update={
        "out_dir": str(rdir / "reward"), "model": cfg.loop.sft_policy, "train_file": str(rdir / "votes.jsonl"),
        "init_from": warm,
    })  # fmt: skip
    result = reward.run(rm_cfg, resume=True, quiet=quiet)
    metrics = {k: v for k, v in result.items() if isinstance(v, int | float)}
    metrics |= {f"votes/{project}": n for project, n in votes_by_project(loop, records).items()}
    if cfg.reward.gold_eval:
        from rlhf.eval.reward_eval import add_gold_eval

        gold = add_gold_eval(rm_cfg.out_dir, [rm_cfg.train_file], rm_cfg.format)
        if gold["gold/pairs"]:  # held-out pairs that gold orders
            metrics["gold/rm_accuracy"] = gold["gold/rm_accuracy"]["accuracy"]
            metrics["gold/label_agreement"] = gold["gold/label_agreement"]["accuracy"]
            metrics["gold/pairs"] = gold["gold/pairs"]
    return RewardModelVersion(
        loop_id=loop.id, name=f"rm-r{round_}", round=round_, parent=parent.name if warm and parent else None,
        path=str(rdir / "reward" / "final"), n_votes=len(records), vote_ids=[r["meta"]["vote_id"] for r in records],
        metrics=metrics,
    )  # fmt: skip


def round_ppo_config(
    cfg: RootConfig, current: PolicyVersion, rm: RewardModelVersion, rdir: Path
) -> PPOConfig:
    """The ppo section with loop.ppo laid over it, for this round: from the current policy, against the new
    reward model (the critic starts from it), KL to the SFT policy, seed ppo.seed + r, and with
    `kl_budget_step` a KL budget of r x kl_budget_step nats."""
    settings = cfg.loop_ppo()
    budget = settings.kl_budget if cfg.loop.kl_budget_step is None else cfg.loop.kl_budget_step * rm.round
    return settings.model_copy(update={
        "out_dir": str(rdir / "ppo"), "policy": current.path, "reference": cfg.loop.sft_policy,
        "reward_model": rm.path, "critic": None, "seed": settings.seed + rm.round, "kl_budget": budget,
        "reward_ensemble": [],  # each round trains one reward model: another run's would score other votes
    })  # fmt: skip


def train_policy(
    cfg: RootConfig, current: PolicyVersion, rm: RewardModelVersion, rdir: Path, quiet: bool
) -> dict[str, Any]:
    """PPO from the current policy against the new reward model, KL to the SFT reference; resumes from its
    checkpoints. The guard's best checkpoint (when it kept one) is the new policy, as in `rlhf demo`."""
    from rlhf.stages import ppo

    ppo_cfg = round_ppo_config(cfg, current, rm, rdir)
    gold_fn = None
    if ppo_cfg.guard_gold:
        from rlhf.eval.judges import gold_utilities

        gold_fn = gold_utilities
    result = ppo.run(ppo_cfg, resume=True, quiet=quiet, gold_fn=gold_fn)
    best = rdir / "ppo" / "best"
    path = best if best.exists() else rdir / "ppo" / "final"
    # the guard's best at iteration 0: no later iteration did better, and the round's policy is its parent
    unchanged = best.exists() and result.get("best_iteration") == 0
    return {"path": str(path), "stop_reason": result["stop_reason"], "ppo/kl": result.get("ppo/kl"),
            "ppo/score": result.get("ppo/score"), "unchanged": unchanged}  # fmt: skip


def train_policy_dpo(
    cfg: RootConfig, db: Database, loop: LoopRun, round_: int, current: PolicyVersion, rdir: Path, quiet: bool
) -> dict[str, Any]:
    """Online (iterative) DPO: this round's votes, on the current policy's own answers, train it further with
    itself (the round's starting point) as the reference, as iterative DPO does (Xu et al. 2023,
    arXiv:2312.16682); the dpo section's settings, resumed from its checkpoints."""
    from rlhf.stages import dpo

    records = round_votes(db, loop, rdir, cfg.loop.undo_window_s, only_round=round_, run="dpo")
    dpo_cfg = cfg.dpo.model_copy(update={
        "out_dir": str(rdir / "dpo"), "policy": current.path, "reference": None,
        "train_file": str(rdir / "votes.jsonl"), "eval_file": None, "seed": cfg.dpo.seed + round_,
    })  # fmt: skip
    result = dpo.run(dpo_cfg, resume=True, quiet=quiet)
    return {"path": str(rdir / "dpo" / "final"), "votes": len(records),
            **{k: v for k, v in result.items() if k.startswith("dpo/eval_")}}  # fmt: skip


def evaluate(cfg: RootConfig, policy: str, rdir: Path) -> dict[str, Any]:
    """The new policy (A) against the SFT policy (B) under the judge, on the held-out prompts."""
    from rlhf.eval.judges import make_judge
    from rlhf.stages.eval import compare

    eval_cfg = cfg.eval.model_copy(update={"reference": cfg.loop.sft_policy})
    summary = compare(policy, cfg.loop.sft_policy, eval_cfg, make_judge(cfg.eval))
    write_json(rdir / "eval.json", summary)
    return {"win_rate_vs_sft": summary["win_rate_a"], "judge": summary["judge"], "ci95": summary["ci95"], "wins": summary["wins_a"],
            "ties": summary["ties"], "losses": summary["losses_a"], **{f"a/{k}": v for k, v in summary["a"].items()}}  # fmt: skip


def policy_version(
    loop: LoopRun, round_: int, parent: PolicyVersion, rm: RewardModelVersion | None, trained: dict[str, Any],
    ev: dict[str, Any],
) -> PolicyVersion:  # fmt: skip
    """Round `round_`'s policy: its parent, reward model (none for online DPO), training outcome and evaluation
    against SFT."""
    votes = rm.n_votes if rm is not None else trained["votes"]
    metrics = {
        "win_rate_vs_sft": ev["win_rate_vs_sft"], "judge": ev.get("judge", "gold"), "ci95": ev["ci95"],
        "reward_model_votes": votes,
        "eval": {"baseline": SFT, "wins": ev["wins"], "ties": ev["ties"], "losses": ev["losses"]},
        **{k: v for k, v in trained.items() if k != "path"}, **{k: v for k, v in ev.items() if k.startswith("a/")},
    }  # fmt: skip
    return PolicyVersion(loop_id=loop.id, name=f"r{round_}", round=round_, parent=parent.name,
                         reward_model=None if rm is None else rm.name, path=trained["path"], metrics=metrics)  # fmt: skip


# --- the loop ------------------------------------------------------------------------------------------------


# settings a loop keeps from its first round (log_changed_settings)
SEQUENCE_SETTINGS = ("loop.prompts_per_round", "loop.share_old_prompts")


def log_changed_settings(loop: LoopRun, settings: dict[str, Any]) -> None:
    """Warn of the settings that differ from those the loop started with (more rounds are the usual change);
    refuse another value of those it keeps (SEQUENCE_SETTINGS)."""
    from rlhf.runs import changed_settings, flat_config

    before, now = flat_config(loop.config), flat_config(settings)
    # each round's prompts follow the earlier rounds' in one shuffled sequence, at prompts_per_round a round
    # (round_prompts): another size would draw prompts already asked, or skip some for good
    kept = [
        f"{k} {before[k]!r} -> {now.get(k)!r}"
        for k in SEQUENCE_SETTINGS
        if k in before and before[k] != now.get(k)
    ]
    if kept:
        raise RlhfError(f"loop {loop.name}: {'; '.join(kept)}: the rounds' prompts follow one another at the size "
                        "the loop began with; continue with it, or start a loop of another loop.name")  # fmt: skip
    changed = changed_settings(before, now, frozenset({"loop.rounds"}))
    if changed:
        log.warning("loop %s: started again with settings changed since it began, used from here on: %s",
                    loop.name, "; ".join(changed))  # fmt: skip


def check_extra_projects(session: Session, cfg: RootConfig) -> None:
    """Refuse a project in loop.extra_projects that the store does not hold (a misspelt name, or the model
    server not yet started on this store), before round 1 rather than at its reward phase."""
    held = set(session.scalars(select(Project.name)))
    missing = [p for p in cfg.loop.extra_projects if p not in held]
    if missing:
        raise ConfigError(f"loop.extra_projects: the feedback store holds no project {', '.join(map(repr, missing))} "
                          f"(it holds {', '.join(sorted(held)) or 'none'})")  # fmt: skip


def start_loop(session: Session, cfg: RootConfig) -> LoopRun:
    """The loop run of this name (created with the config the first time), with the SFT policy as round 0; a
    loop started again with other settings logs which (they apply to the phases still to run)."""
    settings = cfg.model_dump(mode="json")
    loop = get_or_create_loop(session, cfg.loop.name, settings)
    log_changed_settings(loop, settings)
    if (0, "register") not in finished_phases(session, loop):
        sft = PolicyVersion(loop_id=loop.id, name=SFT, round=0, parent=None, reward_model=None,
                            path=cfg.loop.sft_policy, metrics={})  # fmt: skip
        finish_phase(session, loop, 0, "register", {"policy": SFT}, [sft])
    return loop


def run(cfg: RootConfig, quiet: bool = False) -> list[PolicyVersion]:
    """Run rounds 1..loop.rounds, skipping what the store records as finished; returns the policy versions.
    One process at a time per out_dir: a second is a one-line error, not a second trainer in the same folders."""
    out = Path(cfg.loop.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".loop.lock").open("a") as lock:
        try:  # released when the file closes, or the process ends
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RlhfError(f"loop {cfg.loop.name}: another `rlhf loop` is running in {out}; let it finish, or "
                            "stop it first") from None  # fmt: skip
        return _rounds(cfg, quiet)


def _rounds(cfg: RootConfig, quiet: bool) -> list[PolicyVersion]:
    lc = cfg.loop
    out = Path(lc.out_dir)
    pool = [row for _, row in iter_jsonl(lc.prompts_file)]
    for n, row in enumerate(pool):
        row.setdefault("prompt_id", f"{Path(lc.prompts_file).stem}:{n + 1}")
    from rlhf.models.loading import describe_source

    describe_source(lc.sft_policy)  # a wrong path fails here, not after the store holds it as version 'sft'
    if lc.panel:
        from rlhf.judges.gold import is_demo_prompt

        if not all(is_demo_prompt(str(row.get("prompt", ""))) for row in pool):
            log.warning("loop: the simulated panel votes by the demo world's gold utility, and %s holds prompts "
                        "not of that world: its votes there measure the demo's criteria only (people vote with "
                        "loop.panel: false)", lc.prompts_file)  # fmt: skip
    if cfg.eval.judge == "reward_model":  # each round's eval: refused now, not after its training
        from rlhf.models.heads import check_reward_model

        check_reward_model(str(cfg.eval.judge_model))
    db = open_database(db_url(cfg))  # unreachable or not a database: one line
    try:
        pool_digest = prompts_digest(pool)
        with db.session() as session:
            check_extra_projects(session, cfg)
            loop = start_loop(session, cfg)
            check_same_pool(session, loop, pool_digest, lc.prompts_file)
        for round_ in range(1, lc.rounds + 1):
            rdir = out / f"round-{round_}"
            rdir.mkdir(parents=True, exist_ok=True)
            with db.session() as session:
                done = finished_phases(session, loop)
                versions = policies(session, loop)
                rms = reward_models(session, loop)
            current = versions[-1]  # the policy this round starts from
            if (round_, "register") in done:
                log.info("loop: round %d already finished (policy r%d), skipped", round_, round_)
                continue

            # 1. generate: this round's prompts, answered by the current policy (and the previous version)
            if pending(done, round_, "generate"):
                write_jsonl(rdir / "prompts.jsonl", round_prompts(pool, round_, cfg))
                sources = [(current, lc.k)]
                if lc.cross_version and current.parent is not None:
                    sources.append((next(v for v in versions if v.name == current.parent), lc.k_previous))
                info = generate_candidates(cfg, round_, rdir, sources) | {"pool": pool_digest}
                with db.session() as session:
                    finish_phase(session, loop, round_, "generate", info)
            # 2. tasks: active (or random) pairs -> comparison tasks, keyed by round and prompt
            if pending(done, round_, "tasks"):
                info = make_tasks(cfg, db, loop, round_, rdir)
                with db.session() as session:
                    finish_phase(session, loop, round_, "tasks", info)
            # 3. votes: the panel (and/or people) vote through the labeling app; wait for min_votes
            if pending(done, round_, "votes"):
                info = collect_votes(cfg, db, loop, round_)
                with db.session() as session:
                    finish_phase(session, loop, round_, "votes", info)
            # 4. reward: retrain on all votes so far, warm start (not for online DPO)
            rm: RewardModelVersion | None = None
            if lc.method == "ppo" and pending(done, round_, "reward"):
                rm = train_reward(cfg, db, loop, round_, rdir, rms[-1] if rms else None, quiet)
                with db.session() as session:
                    finish_phase(
                        session, loop, round_, "reward", {"reward_model": rm.name, "votes": rm.n_votes}, [rm]
                    )
            if lc.method == "ppo":
                with db.session() as session:
                    rm = reward_models(session, loop)[-1]
            # 5. ppo: from the current policy, against the new reward model, KL to the SFT reference;
            #    or dpo: online DPO on this round's votes, from and against the current policy
            if pending(done, round_, lc.method):
                if rm is not None:
                    info = train_policy(cfg, current, rm, rdir, quiet)
                else:
                    info = train_policy_dpo(cfg, db, loop, round_, current, rdir, quiet)
                with db.session() as session:
                    finish_phase(session, loop, round_, lc.method, info)
            with db.session() as session:
                trained = finished_phases(session, loop)[(round_, lc.method)]
            # 6. eval: win rate against the SFT policy
            if pending(done, round_, "eval"):
                info = evaluate(cfg, trained["path"], rdir)
                with db.session() as session:
                    finish_phase(session, loop, round_, "eval", info)
            # 7. register the new policy version (its parent, reward model and metrics)
            with db.session() as session:
                ev = finished_phases(session, loop)[(round_, "eval")]
                new = policy_version(loop, round_, current, rm, trained, ev)
                finish_phase(session, loop, round_, "register", {"policy": new.name}, [new])
            log.info("loop: round %d: policy r%d, %s win rate vs SFT %.3f [%.3f, %.3f]%s", round_, round_,
                     ev.get("judge", "gold"), ev["win_rate_vs_sft"], *ev["ci95"], UNCHANGED if trained.get("unchanged") else "")  # fmt: skip
        with db.session() as session:
            return policies(session, loop)
    finally:
        db.dispose()
