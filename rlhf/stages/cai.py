"""`rlhf cai revise` and `rlhf cai label`: Constitutional AI (Bai et al. 2022, https://arxiv.org/abs/2212.08073).

revise (SL-CAI): the policy answers each prompt (red-team prompts and ordinary ones); a model (the reviser,
by default the policy itself) writes a critique of the answer under a principle drawn from the constitution,
then a revision that meets it; n_revisions times, each under a fresh draw. The prompt with the final
revision is SFT data; (final revision > original answer) a preference pair. The critique and revision
prompts follow the paper's few-shot format (CritiqueRequest / Critique / RevisionRequest / Revision).

label (RL-CAI, "RLAIF"): the policy answers each prompt twice; a judge (rlhf.judges: a local causal LM read
from its choice-token probabilities in both orders, an endpoint, ...) says which answer is better under the
comparison question of a drawn principle. Each judgement is a preference record (a vote of labeler
`ai:<judge>`, with the principle and P(first) in its meta); with `push_db` the records go to the labeling
store as that labeler's votes, the principle in each vote's note, so that the reward model can train on AI
labels for harmlessness next to people's labels for helpfulness (docs/cai.md).

Both stages draw a principle among those that apply to the prompt (`applies_to` in the constitution: patterns
the prompt's words match); a prompt no principle applies to is left out (label counts them in its summary as
`unrouted_prompts`), so a constitution of harmlessness principles labels only the requests they are about.

Both stages are resumable: prompts already written are skipped.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm import tqdm

from rlhf.config import CaiConfig, EvalConfig, dump_config
from rlhf.constitution import Constitution, Principle, find_constitution, load_constitution
from rlhf.data.jsonl import atomic_write_text, check_output_dir, iter_jsonl, write_jsonl
from rlhf.data.preferences import PairwiseVote, PreferencePair, read_records, write_preferences
from rlhf.data.prompts import read_prompt_rows
from rlhf.engine.decoding import SamplingParams
from rlhf.errors import RlhfError
from rlhf.judges.base import Answer, Judge
from rlhf.models.loading import load_tokenizer
from rlhf.runs import check_same_input, check_same_settings
from rlhf.text_models import TextModel, load_text_model

log = logging.getLogger(__name__)
# settings a resumed run may change: how many prompts and pairs it covers, how fast it asks; the rest made its rows
RESUMES_WITH = frozenset({"out_dir", "prompts_files", "n_prompts", "pairs_per_prompt", "batch_size", "push_db", "project",
                          "judge_requests_per_s", "judge_concurrency", "judge_timeout_s", "judge_retries",
                          "judge_cache", "judge_db", "judge_server", "judge_token_env", "judge_project"})  # fmt: skip

CRITIQUE = "{conversation}\n\nCritiqueRequest: {request}\nCritique:"
REVISION = "{critique_prompt} {critique}\n\nRevisionRequest: {request}\nRevision:"
STOPS = ("\n\n", "CritiqueRequest:", "RevisionRequest:", "Critique:", "Revision:", "\nUser:")


def read_prompts(files: Sequence[str], n_each: int, tokenizer: Any = None) -> list[str]:
    """The prompts of every source (any of rlhf.data.sources), in order, each once; `messages` rows rendered
    through `tokenizer`'s chat template (the local policy's). A missing source is a one-line error."""
    prompts: dict[str, None] = {}
    for path in files:
        prompts.update((text, None) for _, text in read_prompt_rows(path, n_each, tokenizer))
    return list(prompts)


def policy_tokenizer(cfg: CaiConfig, policy: TextModel | None) -> Any:
    """The local policy's tokenizer, which renders `messages` prompt rows as `rlhf bon` does; None for a policy
    behind an endpoint, or given as a model (their prompts are text)."""
    return None if cfg.policy_url or policy is not None else load_tokenizer(cfg.policy)


def check_same_constitution(out: Path, rows: Path, constitution: Path) -> None:
    """The constitution's content, kept in OUT/constitution.sha256: a resume with the file edited in place would
    label (or revise) the rest of the prompts under other principles than the rows already written."""
    check_same_input(out, rows, constitution, "constitution.sha256")


def cut(text: str) -> str:
    """A generated critique or revision up to where the model starts the next part of the dialogue."""
    for stop in STOPS:
        text = text.split(stop, 1)[0]
    return text.strip()


def _models(cfg: CaiConfig, policy: TextModel | None) -> TextModel:
    return policy or load_text_model(cfg.policy, cfg.policy_url, batch_size=cfg.batch_size, seed=cfg.seed,
                                     api_key_env=cfg.api_key_env)  # fmt: skip


def _done(path: Path) -> dict[str, dict[str, Any]]:
    return {row["prompt"]: row for _, row in iter_jsonl(path)} if path.is_file() else {}


def revise(cfg: CaiConfig, quiet: bool = False, policy: TextModel | None = None,
           reviser: TextModel | None = None) -> dict[str, Any]:  # fmt: skip
    """SL-CAI data: critique-revision rounds on the policy's answers; writes revisions, sft and pairs JSONL."""
    check_output_dir(cfg.out_dir, "--out")
    constitution_file = find_constitution(cfg.constitution)
    constitution = load_constitution(constitution_file)  # read before any output or model
    prompts = read_prompts(cfg.prompts_files, cfg.n_prompts, policy_tokenizer(cfg, policy))
    out = Path(cfg.out_dir)
    check_same_settings(out, cfg.model_dump(mode="json"), out / "revisions.jsonl", RESUMES_WITH)
    check_same_constitution(out, out / "revisions.jsonl", constitution_file)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    done = _done(out / "revisions.jsonl")
    unrouted = [p for p in prompts if not constitution.applicable(p)]  # no critique, no revision
    prompts = [p for p in prompts if constitution.applicable(p)]
    todo = [p for p in prompts if p not in done]
    log.info("cai revise: %d prompts, %d revised before, %d that no principle applies to left out",
             len(prompts), len(prompts) - len(todo), len(unrouted))  # fmt: skip
    policy = _models(cfg, policy)
    if reviser is None:
        reviser = policy if cfg.reviser is None and cfg.reviser_url is None else load_text_model(
            cfg.reviser or cfg.policy, cfg.reviser_url, batch_size=cfg.batch_size, seed=cfg.seed + 1,
            api_key_env=cfg.api_key_env)  # fmt: skip
    answer_params = SamplingParams(cfg.max_new_tokens, cfg.temperature, 0, cfg.top_p)
    critique_params = SamplingParams(cfg.critique_max_tokens, cfg.temperature, 0, cfg.top_p)
    rng = random.Random(f"{cfg.seed}:revise:{len(done)}")
    bar = tqdm(total=len(todo), desc="cai revise", disable=quiet, dynamic_ncols=True)
    for i in range(0, len(todo), cfg.batch_size):
        chunk = todo[i : i + cfg.batch_size]
        # 1. the policy answers
        originals = [r.text for r in policy.complete_all(chunk, answer_params)]
        current = list(originals)
        steps: list[list[dict[str, str]]] = [[] for _ in chunk]
        for _ in range(cfg.n_revisions):
            principles = [_draw(constitution, p, rng) for p in chunk]
            # 2. a critique under a drawn principle
            critique_prompts = [CRITIQUE.format(conversation=f"{p}{a}", request=pr.critique_request)
                                for p, a, pr in zip(chunk, current, principles, strict=True)]  # fmt: skip
            critiques = [cut(r.text) for r in reviser.complete_all(critique_prompts, critique_params)]
            # 3. a revision that meets it (an empty one keeps the answer as it was)
            revision_prompts = [REVISION.format(critique_prompt=c, critique=k, request=pr.revision_request)
                                for c, k, pr in zip(critique_prompts, critiques, principles, strict=True)]  # fmt: skip
            revisions = [cut(r.text) for r in reviser.complete_all(revision_prompts, answer_params)]
            for j, (pr, k, rev) in enumerate(zip(principles, critiques, revisions, strict=True)):
                steps[j].append({"principle": pr.id, "critique": k, "revision": rev})
                if rev:
                    current[j] = (" " if originals[j].startswith(" ") else "") + rev
        for p, a, rev, s in zip(chunk, originals, current, steps, strict=True):
            done[p] = {"prompt": p, "original": a, "revision": rev, "steps": s}
        write_jsonl(out / "revisions.jsonl", done.values())
        bar.update(len(chunk))
    bar.close()

    # 4. SFT rows and preference pairs from every prompt revised, this run or before
    rows = [done[p] for p in prompts if p in done]
    # an answer no revision step rewrote (the reviser said nothing) is the policy's own, not a revision
    revised = [r for r in rows if r["revision"].strip() and any(step["revision"] for step in r["steps"])]
    if len(revised) < len(rows):
        log.warning("cai revise: %d of %d answers got no revision (the reviser answered nothing): left out of "
                    "sft.jsonl", len(rows) - len(revised), len(rows))  # fmt: skip
    sft = [{"prompt": r["prompt"], "response": r["revision"]} for r in revised]
    pairs = [PreferencePair(r["prompt"], r["revision"], r["original"], labeler="cai-revision")
             for r in revised if r["revision"].strip() != r["original"].strip()]  # fmt: skip
    write_jsonl(out / "sft.jsonl", sft)
    write_preferences(out / "pairs.jsonl", pairs)
    return {
        "prompts": len(rows),
        "sft_rows": len(sft),
        "pairs": len(pairs),
        "unrevised": len(rows) - len(revised),
        "unrouted_prompts": len(unrouted),
    }


def _draw(constitution: Constitution, prompt: str, rng: random.Random) -> Principle:
    principle = constitution.draw_for(prompt, rng)
    if principle is None:  # the stages leave such prompts out before drawing
        raise RlhfError(f"no principle of the constitution applies to the prompt {prompt[:60]!r}")
    return principle


def judge_under_principles(judge: Judge, pairs: Sequence[tuple[str, str, str]], constitution: Constitution,
                           rng: random.Random) -> list[tuple[str, float]]:  # fmt: skip
    """(principle id, P(first better)) per (prompt, first, second): each pair under a principle drawn among
    those that apply to its prompt (an error if none does), the pairs of one principle asked together."""
    drawn = [_draw(constitution, prompt, rng) for prompt, _, _ in pairs]
    by_principle: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(drawn):
        by_principle[p.id].append(i)
    p_first = [0.5] * len(pairs)
    for pid, idx in by_principle.items():
        asked = [(pairs[i][0], Answer(pairs[i][1]), Answer(pairs[i][2])) for i in idx]
        principle = constitution.get(pid)
        # a pointwise judge reviews one answer under the principle's statement; a pairwise one answers its question
        text = principle.principle if getattr(judge, "reads_statement", False) else principle.comparison
        for i, x in zip(idx, judge.compare_all(asked, text), strict=True):
            p_first[i] = x
    return [(p.id, x) for p, x in zip(drawn, p_first, strict=True)]


def label(cfg: CaiConfig, eval_cfg: EvalConfig, quiet: bool = False, policy: TextModel | None = None,
          judge: Judge | None = None) -> dict[str, Any]:  # fmt: skip
    """RL-CAI labels: two answers per prompt, judged under drawn principles; labels.jsonl, optionally pushed."""
    check_output_dir(cfg.out_dir, "--out")
    constitution_file = find_constitution(cfg.constitution)
    constitution = load_constitution(constitution_file)
    prompts = read_prompts(cfg.prompts_files, cfg.n_prompts, policy_tokenizer(cfg, policy))
    out = Path(cfg.out_dir)
    # the judge's settings are eval's: recorded beside the stage's, so that a resume checks them too (before
    # any model is loaded)
    judging = {k: v for k, v in eval_cfg.model_dump(mode="json").items() if k.startswith("judge")}
    settings = {"cai": cfg.model_dump(mode="json"), "eval": judging}
    check_same_settings(out, settings, out / "labels.jsonl", RESUMES_WITH)
    check_same_constitution(out, out / "labels.jsonl", constitution_file)
    if judge is None:
        from rlhf.eval.judges import make_judge

        judge = make_judge(eval_cfg)
    # the judge and its model, as the red team names its classifier: two judges' labels of the same pairs are
    # two labelers (their own weights, their own groups), not one that disagrees with itself
    kind = getattr(judge, "name", eval_cfg.judge)
    labeler = cfg.labeler or (f"ai:{kind}:{eval_cfg.judge_model}" if eval_cfg.judge_model else f"ai:{kind}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(settings, sort_keys=False))
    path = out / "labels.jsonl"
    done: dict[tuple[str, int], PairwiseVote] = {}  # (prompt, pair index) -> label
    if path.is_file():
        for _, r in read_records(str(path), "vote"):
            if isinstance(r, PairwiseVote):
                done[(r.prompt, sum(key[0] == r.prompt for key in done))] = r
    unrouted = [p for p in prompts if not constitution.applicable(p)]
    prompts = [p for p in prompts if constitution.applicable(p)]
    todo = [(p, k) for p in prompts for k in range(cfg.pairs_per_prompt) if (p, k) not in done]
    log.info("cai label: %d prompts, %d that no principle applies to left out", len(prompts), len(unrouted))
    policy = _models(cfg, policy)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, 0, cfg.top_p)
    rng = random.Random(f"{cfg.seed}:label:{len(done)}")
    bar = tqdm(total=len(todo), desc="cai label", disable=quiet, dynamic_ncols=True)
    for i in range(0, len(todo), cfg.batch_size):
        chunk = todo[i : i + cfg.batch_size]
        # 1. two answers per prompt; 2. the judge compares them under a drawn principle
        answers = [r.text for r in policy.complete_all([p for p, _ in chunk for _ in range(2)], params)]
        pairs = [(p, answers[2 * j], answers[2 * j + 1]) for j, (p, _) in enumerate(chunk)]
        for key, (p, a, b), (pid, x) in zip(
            chunk, pairs, judge_under_principles(judge, pairs, constitution, rng), strict=True
        ):
            choice: Literal["A", "B", "tie"] = (
                "tie" if abs(x - 0.5) <= cfg.tie_within else "A" if x > 0.5 else "B"
            )
            done[key] = PairwiseVote(
                p, a, b, choice, labeler, meta={"principle": pid, "p_first": round(x, 6)}
            )
        write_preferences(path, done.values())
        bar.update(len(chunk))
    bar.close()
    records = [done[(p, k)] for p in prompts for k in range(cfg.pairs_per_prompt) if (p, k) in done]
    if len(done) > len(
        records
    ):  # resumed with fewer prompts or pairs, or prompts no principle now applies to
        log.warning("cai label: %s also holds %d labels of an earlier run beyond this one's prompts and pairs: "
                    "counted here, and pushed, are the %d of this run", path, len(done) - len(records), len(records))  # fmt: skip
    summary: dict[str, Any] = {"records": len(records), "labeler": labeler,
                               "ties": sum(r.choice == "tie" for r in records),
                               "unrouted_prompts": len(unrouted), "kept_beyond": len(done) - len(records)}  # fmt: skip
    if cfg.push_db:
        from rlhf.feedback.db import open_database
        from rlhf.feedback.preference_import import import_preferences

        database = open_database(cfg.push_db)
        with database.session() as session:
            pushed = import_preferences(session, cfg.project, labeler,
                                        [(f"{path}:{n}", r) for n, r in enumerate(records, 1)], meta_as_note=True)  # fmt: skip
        summary["pushed"] = pushed.votes
    return summary
