"""`rlhf demo`: every stage of the pipeline on the built-in demo task, in one run directory, resumable.

Each stage writes into RUN/<stage>/ and is recorded in RUN/stages.json when it finishes (with its wall time);
started again, the demo skips the finished stages and resumes an unfinished training stage from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.config import RootConfig, load_config, text_override
from rlhf.data.jsonl import write_json
from rlhf.errors import ConfigError

log = logging.getLogger(__name__)

# --fast: the same pipeline, reduced everywhere, for CI and a first look.
FAST_OVERRIDES = [
    "data.n_pretrain=6000",
    "data.n_sft=800",
    "data.n_rl_prompts=400",
    "data.n_eval_prompts=100",
    "data.n_tune_prompts=64",
    "pretrain.arch.hidden_size=64",
    "pretrain.arch.intermediate_size=192",
    "pretrain.arch.num_hidden_layers=2",
    "pretrain.block_size=96",
    "pretrain.batch_size=16",
    "pretrain.micro_batch_size=16",
    "sft.epochs=1",
    "generate.max_prompts=120",
    "generate.short_k=1",
    "reward.normalise.n_prompts=64",
    "ppo.iterations=12",
    "ppo.lr=2e-4",  # a dozen iterations: the larger steps the full demo gave up for its 80
    "ppo.guard_every=4",
    "ppo.guard_prompts=32",
    "ppo.save_every=6",
    "eval.n_prompts=100",
    "eval.redteam_samples=2",
]


DEMO_DIR = "runs/demo/"  # the run directory the demo's config names; `--out` moves it


def default_config_path() -> Path | None:
    """configs/demo.yaml of a source checkout, or the copy shipped in the package."""
    package = Path(__file__).parents[1]  # rlhf/
    for candidate in (package.parent / "configs" / "demo.yaml", package / "_configs" / "demo.yaml"):
        if candidate.is_file():
            return candidate
    return None


def demo_config(out: Path, fast: bool, config: Path | None, overrides: list[str]) -> RootConfig:
    """The demo's config with every path pointed into the run directory."""
    data = out / "data"
    paths = [
        text_override("pretrain.out_dir", out / "pretrain"),
        text_override("pretrain.train_file", data / "pretrain.txt"),
        text_override("sft.out_dir", out / "sft"),
        text_override("sft.model", out / "pretrain" / "final"),
        text_override("sft.train_file", data / "sft.jsonl"),
        text_override("generate.model", out / "sft" / "final"),
        text_override("generate.prompts_file", data / "rl_prompts.jsonl"),
        text_override("generate.out", out / "candidates.jsonl"),
        "generate.policy_version=sft",
        text_override("reward.out_dir", out / "reward"),
        text_override("reward.model", out / "sft" / "final"),
        text_override("reward.train_file", out / "votes.jsonl"),
        text_override("ppo.out_dir", out / "ppo"),
        text_override("ppo.policy", out / "sft" / "final"),
        text_override("ppo.reward_model", out / "reward" / "final"),
        text_override("ppo.prompts_file", data / "rl_prompts.jsonl"),
        text_override("ppo.eval_prompts_file", data / "tune_prompts.jsonl"),
        text_override("eval.prompts_file", data / "eval_prompts.jsonl"),
        text_override("eval.reference", out / "sft" / "final"),
    ]
    cfg = load_config(
        config or default_config_path(), [*(FAST_OVERRIDES if fast else []), *overrides, *paths]
    )

    # other policies that answer the candidates' prompts, and the reward models beside the first one that
    # PPO scores with, named in the config by their place in runs/demo
    def moved(paths: list[str]) -> str:
        return json.dumps(
            [str(out / m.removeprefix(DEMO_DIR)) if m.startswith(DEMO_DIR) else m for m in paths]
        )

    return load_config(
        config or default_config_path(),
        [*(FAST_OVERRIDES if fast else []), *overrides, *paths,
         f"generate.extra_models={moved(cfg.generate.extra_models)}",
         f"ppo.reward_ensemble={moved(cfg.ppo.reward_ensemble)}"],
    )  # fmt: skip


# the config sections each stage runs on: a finished stage records them, so that a later run of the demo in the
# same directory with other settings is refused rather than reporting the earlier settings' results as its own
STAGE_SECTIONS = {"data": ("data",), "pretrain": ("pretrain",), "sft": ("sft",), "generate": ("generate",),
                  "label": ("panel",), "reward": ("reward",), "ppo": ("ppo",), "eval": ("eval",)}  # fmt: skip


# settings that change how a stage runs but not what it produces
RESULT_NEUTRAL = frozenset({"log_every", "save_every", "keep_checkpoints", "log_with", "endpoint_concurrency",
                            "endpoint_retries", "endpoint_timeout_s", "endpoint_api_key_env"})  # fmt: skip


def stage_settings(cfg: RootConfig, out: Path, name: str) -> dict[str, Any] | None:
    """The settings stage `name` runs with (its config sections, dotted keys, the run directory as "RUN" so that
    a moved run directory is the same run), or None for a stage that reads none (the report)."""
    sections = STAGE_SECTIONS.get(name.split("-")[0])  # reward-1, reward-2: the reward section
    if sections is None:
        return None
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            inside = isinstance(value, str) and (value == str(out) or value.startswith(f"{out}/"))
            flat[prefix] = "RUN" + value[len(str(out)) :] if inside else value

    for section in sections:
        walk(section, getattr(cfg, section).model_dump(mode="json"))
    return flat


class Stages:
    """RUN/stages.json: which stages finished, how long each took, and the settings each ran with."""

    def __init__(self, out: Path, cfg: RootConfig | None = None) -> None:
        self.out, self.cfg = out, cfg
        self.path = out / "stages.json"
        self.done: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def check_settings(self) -> None:
        """ConfigError where a finished stage ran with other settings than this run's (stages recorded by a build
        that kept no settings are taken as they are)."""
        assert self.cfg is not None
        changed = []
        for name, info in self.done.items():
            before, now = info.get("settings"), stage_settings(self.cfg, self.out, name)
            if before is None or now is None:
                continue
            # a setting only one build has (added or removed since) is not a change of this run's, nor is one that
            # cannot change a stage's results (how often it logs or keeps checkpoints, how it reaches an engine)
            keys = sorted(k for k in before.keys() & now.keys()
                          if before[k] != now[k] and k.rsplit(".", 1)[-1] not in RESULT_NEUTRAL)  # fmt: skip
            if not keys:
                continue
            shown = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in keys[:3])
            changed.append(f"{name} ({shown}{f', and {len(keys) - 3} more' if len(keys) > 3 else ''})")
        if changed:
            raise ConfigError(
                f"{self.out} holds finished stages that ran with other settings: {'; '.join(changed)}. A finished "
                "stage is not run again, so its results would be reported as this run's: use another --out, or "
                f"remove {self.out} to run every stage with these settings"
            )

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        if name in self.done:
            log.info("demo: %s already finished, skipped", name)
            return
        t0, load = time.perf_counter(), _load_average()
        result = fn() or {}
        settings = None if self.cfg is None else stage_settings(self.cfg, self.out, name)
        self.done[name] = {
            # the stage's own figures, but its time is the timer's: a stage that times part of its work (generate
            # its sampling) does not replace the whole stage's
            **{k: v for k, v in result.items() if isinstance(v, int | float | str) and k != "seconds"},
            "seconds": round(time.perf_counter() - t0, 2),
            # the load average at its start and end, beside the CPU count: the time is the machine's alone only
            # where the load stayed near what this run itself puts on it
            **({"load": [load, _load_average()], "cpus": os.cpu_count()} if load is not None else {}),
            **({"settings": settings} if settings is not None else {}),
        }
        write_json(self.path, self.done)


def _load_average() -> float | None:
    """The 1-minute load average, where the system reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


PROJECT = "demo"


def train_reward(cfg: RootConfig, quiet: bool) -> dict[str, Any]:
    """The reward model on the exported votes, then its accuracy against gold beside the panel's."""
    from rlhf.eval.reward_eval import add_gold_eval
    from rlhf.stages import reward

    result = reward.run(cfg.reward, resume=True, quiet=quiet)
    gold = add_gold_eval(cfg.reward.out_dir, [cfg.reward.train_file], cfg.reward.format)
    return {
        "pairs": result["train_pairs"],
        "rm_gold_accuracy": gold["gold/rm_accuracy"]["accuracy"],
        "panel_gold_agreement": gold["gold/label_agreement"]["accuracy"],
    }


def train_reward_member(cfg: RootConfig, member: int, quiet: bool) -> dict[str, Any]:
    """One more reward model of PPO's ensemble (`ppo.reward_ensemble`): the same votes, another seed, written
    where the config names it (.../final)."""
    from rlhf.stages import reward

    path = Path(cfg.ppo.reward_ensemble[member - 1])
    if path.name != "final":
        raise ConfigError(
            f"ppo.reward_ensemble: the demo trains its reward models into <run dir>/final, not {path}"
        )
    member_cfg = cfg.reward.model_copy(update={"out_dir": str(path.parent), "seed": cfg.reward.seed + member,
                                               "gold_eval": False})  # fmt: skip
    result = reward.run(member_cfg, resume=True, quiet=quiet)
    return {"pairs": result["train_pairs"]}


def train_ppo(cfg: RootConfig, quiet: bool) -> dict[str, Any]:
    """PPO with the KL penalty; the guard watches held-out KL, proxy reward and gold utility."""
    from rlhf.eval.judges import gold_utilities
    from rlhf.stages import ppo

    result = ppo.run(
        cfg.ppo, resume=True, quiet=quiet, gold_fn=gold_utilities if cfg.ppo.guard_gold else None
    )
    return {"stop_reason": result["stop_reason"]}


def ppo_policy(out: Path) -> Path:
    """The PPO policy to evaluate: the guard's best checkpoint (by gold on held-out prompts) when it kept one."""
    best = out / "ppo" / "best"
    return best if best.exists() else out / "ppo" / "final"


def evaluate(out: Path, cfg: RootConfig) -> dict[str, Any]:
    """PPO vs SFT and pretrained vs SFT under the gold judge, on the held-out prompts; example rows drawn at
    random (fixed seed) from every question family; what the reward model makes of answers of every kind; how
    often the correct answer is among the SFT policy's K candidates."""
    from rlhf.eval.judges import make_judge
    from rlhf.stages.eval import Answered, compare

    judge = make_judge(cfg.eval)
    sft = str(out / "sft" / "final")
    results: dict[str, Any] = {}
    answered: Answered = {}  # SFT answers the same prompts in both comparisons: sampled once
    for name, policy in (
        ("ppo_vs_sft", str(ppo_policy(out))),
        ("pretrained_vs_sft", str(out / "pretrain" / "final")),
    ):
        summary = compare(policy, sft, cfg.eval, judge, answered)
        results[f"{name}_win_rate"] = summary["win_rate_a"]
        if name == "ppo_vs_sft":
            summary["by_family"] = outcomes_by_family(summary["rows"])
            summary["ceiling_win_rate"] = ceiling_win_rate(summary["rows"])
            summary["yesno_reasoning"] = yesno_reasoning(summary["rows"])
            summary["arithmetic_values"] = arithmetic_values(summary["rows"])
            summary["prompt_overlap"] = prompt_overlap(summary["rows"], cfg)
            rows = examples_by_family(summary["rows"], per_family=2, seed=cfg.eval.seed)
            write_json(out / "eval" / "examples.json", score_examples(rows, out / "reward" / "final"))
        write_json(out / "eval" / f"{name}.json", summary)
    from rlhf.data.prompts import read_prompts

    kinds = reward_by_kind(read_prompts(cfg.eval.prompts_file, 200), out / "reward" / "final")
    write_json(out / "eval" / "reward_by_kind.json", kinds)
    values = reward_value_check(out / "reward" / "final", Path(sft))
    values["arithmetic"].update(value_prior(out / "reward" / "final"))
    write_json(out / "eval" / "reward_values.json", values)
    coverage = candidate_coverage(cfg.generate.out)
    write_json(out / "eval" / "sft_coverage.json", coverage)
    results["sft_correct_among_k"] = coverage["correct_among_k"]
    return results


def prompt_overlap(rows: list[dict[str, Any]], cfg: RootConfig) -> dict[str, int]:
    """How many of the evaluated prompts are distinct, and how many also occur, word for word, among the SFT
    demonstrations', PPO's and the guard's (tuning) prompts. The evaluation prompts are a draw of their own, but
    the demo world's questions are few, so most recur across draws: its rates are on questions the policies
    trained on, not on unseen ones."""
    from rlhf.data.prompts import read_prompts
    from rlhf.data.sources import iter_rows

    prompts = [r["prompt"] for r in rows]
    sets: dict[str, set[Any]] = {"sft": {row.get("prompt") for _, row in iter_rows(cfg.sft.train_file)},
            "ppo": set(read_prompts(cfg.ppo.prompts_file)),
            "tune": set(read_prompts(cfg.ppo.eval_prompts_file)) if cfg.ppo.eval_prompts_file else set()}  # fmt: skip
    return {"prompts": len(prompts), "distinct": len(set(prompts)),
            **{f"in_{name}": sum(p in seen for p in prompts) for name, seen in sets.items()}}  # fmt: skip


def outcomes_by_family(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per question family: wins, ties and losses of A (by gold utility), and how often each policy is correct
    and how often B's answer is already one of the best there are (which no answer of A can beat)."""
    from rlhf.labelers import gold

    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        q = gold.parse_question(row["prompt"])
        a, b = (
            gold.judge(row["prompt"], row["a"], row["ended_a"]),
            gold.judge(row["prompt"], row["b"], row["ended_b"]),
        )
        f = out.setdefault(q.family, {"n": 0, "wins_a": 0, "ties": 0, "losses_a": 0, "correct_a": 0, "correct_b": 0,
                                      "best_b": 0})  # fmt: skip
        f["n"] += 1
        f["wins_a" if a.utility > b.utility else "ties" if a.utility == b.utility else "losses_a"] += 1
        f["correct_a"] += a.correct
        f["correct_b"] += b.correct
        f["best_b"] += b.utility >= best_utility(row["prompt"])
    return dict(sorted(out.items()))


_CONCLUSION = re.compile(r"\bThe (\w+) (?:is|lives in|eats) (\w+), so (yes|no)\b")


def yesno_reasoning(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per policy (a, b), over the yes/no questions about the world's creatures: how many answers state the
    creature's attribute before concluding ("The pip eats nuts, so no."), in how many the stated fact is true, and
    in how many the conclusion follows from the stated fact (yes exactly when it names what was asked). Knowing the
    fact and drawing the conclusion are separate skills; this tells which one a policy lacks."""
    from rlhf.data import demo_task
    from rlhf.labelers import gold

    out = {side: {"questions": 0, "states_fact": 0, "fact_true": 0, "follows": 0} for side in ("a", "b")}
    for row in rows:
        q = gold.parse_question(row["prompt"])
        if q.family != "yesno":
            continue
        for side, counts in out.items():
            counts["questions"] += 1
            m = _CONCLUSION.search(row[side])
            if m is None or m.group(1) != q.subject:
                continue
            stated, conclusion = m.group(2), m.group(3)
            counts["states_fact"] += 1
            counts["fact_true"] += stated == demo_task.FACTS[q.subject][q.attribute]
            counts["follows"] += (stated == q.extra["asked"]) == (conclusion == "yes")
    return out


def arithmetic_values(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per policy (a, b), over the arithmetic questions: how many answers state a result, and how often each value
    is stated and how often it is then right. A policy whose reward model cannot check values drifts towards the
    values that reward model favours whatever the question (`value_prior`); this shows it."""
    from rlhf.labelers import gold

    out: dict[str, dict[str, Any]] = {side: {"questions": 0, "values": {}} for side in ("a", "b")}
    for row in rows:
        q = gold.parse_question(row["prompt"])
        if q.family != "arithmetic":
            continue
        for side, counts in out.items():
            counts["questions"] += 1
            stated = gold.stated_numbers(q, row[side])
            if not stated:
                continue
            value = counts["values"].setdefault(stated[-1], {"stated": 0, "right": 0})
            value["stated"] += 1
            value["right"] += stated[-1] == q.answer
    for counts in out.values():
        counts["values"] = dict(
            sorted(counts["values"].items(), key=lambda kv: (-kv[1]["stated"], int(kv[0])))
        )
    return out


def best_utility(prompt: str) -> float:
    """Gold's utility of the best answer the demo world has to `prompt` (a concise correct one)."""
    from rlhf.data import demo_task
    from rlhf.labelers import gold

    q = gold.parse_question(prompt)
    return max(gold.utility(prompt, " " + t, True) for t in demo_task.answer_templates(q, q.answer))


def ceiling_win_rate(rows: list[dict[str, Any]]) -> float:
    """The win rate (ties half) over B that a policy answering every prompt as well as gold allows would get:
    a tie wherever B's answer is already one of the best. The most any policy can win against B's answers."""
    from rlhf.labelers import gold

    best = [gold.utility(r["prompt"], r["b"], r["ended_b"]) >= best_utility(r["prompt"]) for r in rows]
    return (len(best) - sum(best) / 2) / len(best)


def examples_by_family(rows: list[dict[str, Any]], per_family: int, seed: int) -> list[dict[str, Any]]:
    """`per_family` rows of every question family, drawn at random with a fixed seed (never chosen by score)."""
    import random

    from rlhf.labelers import gold

    by_family: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_family.setdefault(gold.parse_question(row["prompt"]).family, []).append(row)
    rng = random.Random(seed)
    picked = []
    for family in sorted(by_family):
        picked += [
            {**r, "family": family}
            for r in rng.sample(by_family[family], min(per_family, len(by_family[family])))
        ]
    return picked


def reward_model_scores(reward_model: Path, prompts: list[str], texts: list[str]) -> list[float]:
    """The reward model's normalised scores of each (prompt, answer), every answer ended with EOS."""
    import torch

    from rlhf.engine.decoding import left_pad
    from rlhf.models.heads import load_scalar_model, sequence_rewards
    from rlhf.models.loading import load_tokenizer
    from rlhf.models.tokens import encode_completions, encode_prompts

    tokenizer = load_tokenizer(str(reward_model))
    rm = load_scalar_model(str(reward_model)).eval()
    scores: list[float] = []
    for i in range(0, len(texts), 64):
        ids = [
            p + t
            for p, t in zip(
                encode_prompts(tokenizer, prompts[i : i + 64]),
                encode_completions(tokenizer, texts[i : i + 64]),
                strict=True,
            )
        ]
        batch, mask = left_pad(ids, tokenizer.pad_token_id)
        with torch.no_grad():
            scores += sequence_rewards(rm, batch, mask).tolist()
    return scores


def _policy_loglik(policy: Path, prompts: list[str], texts: list[str]) -> list[float]:
    """log p(answer + EOS | prompt) under a causal LM: the sum over the answer's tokens."""
    import torch

    from rlhf.engine.decoding import left_pad
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.models.tokens import encode_completions, encode_prompts

    tokenizer = load_tokenizer(str(policy))
    model = load_causal_lm(str(policy), tokenizer=tokenizer).eval()
    out: list[float] = []
    for i in range(0, len(texts), 64):
        prompt_ids = encode_prompts(tokenizer, prompts[i : i + 64])
        answer_ids = encode_completions(tokenizer, texts[i : i + 64])
        batch, mask = left_pad(
            [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)], tokenizer.pad_token_id
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logp = (
                model(input_ids=batch, attention_mask=mask, position_ids=positions)
                .logits.float()
                .log_softmax(-1)
            )
        for row, answer in enumerate(answer_ids):  # left padding: each answer ends the row
            n = len(answer)
            targets = batch[row, -n:]
            out.append(float(logp[row, -n - 1 : -1].gather(1, targets[:, None]).sum()))
    return out


def score_examples(rows: list[dict[str, Any]], reward_model: Path) -> list[dict[str, Any]]:
    """Example answers of PPO (a) and SFT (b) with their gold utility and reward-model score."""
    from rlhf.labelers import gold

    prompts = [r["prompt"] for r in rows]
    rm_ppo = reward_model_scores(reward_model, prompts, [r["a"] for r in rows])
    rm_sft = reward_model_scores(reward_model, prompts, [r["b"] for r in rows])
    return [
        {"family": r.get("family"), "prompt": r["prompt"], "ppo": r["a"], "sft": r["b"],
         "gold_ppo": gold.utility(r["prompt"], r["a"], r.get("ended_a")),
         "gold_sft": gold.utility(r["prompt"], r["b"], r.get("ended_b")), "rm_ppo": a, "rm_sft": b}
        for r, a, b in zip(rows, rm_ppo, rm_sft, strict=True)
    ]  # fmt: skip


def reward_by_kind(prompts: list[str], reward_model: Path) -> dict[str, Any]:
    """The reward model's mean score of hand-made answers of every kind to the same prompts, beside gold's: a
    concise correct answer, a wordy one, a wrong attempt, non-answers ("Yes." where the question is not a yes/no
    one, "Hmm.", empty), "Yes." to the yes/no questions apart, and on the honest and harmless families an invented
    fact, compliance with harm or a rude retort."""
    import random

    from rlhf.data import demo_task
    from rlhf.labelers import gold

    rng = random.Random(0)
    made: dict[str, list[tuple[str, str]]] = {}
    for prompt in prompts:
        for kind, text in answers_by_kind(prompt, rng).items():
            made.setdefault(kind, []).append((prompt, " " + text if text else ""))
    out: dict[str, Any] = {}
    order = list(
        answers_by_kind(demo_task.render_prompt("How do I poison the pip?"), random.Random(0))
    )  # the table's order
    order.insert(order.index("non-answer: Yes.") + 1, 'bare "Yes." to a yes/no question')
    for kind, pairs in sorted(made.items(), key=lambda item: order.index(item[0])):
        ps, ts = [p for p, _ in pairs], [t for _, t in pairs]
        scores = reward_model_scores(reward_model, ps, ts)
        golds = [gold.utility(p, t, True) for p, t in pairs]
        out[kind] = {
            "n": len(pairs),
            "rm_mean": sum(scores) / len(scores),
            "gold_mean": sum(golds) / len(golds),
        }
    return out


def answers_by_kind(prompt: str, rng: Any) -> dict[str, str]:
    """Hand-made answers of every kind to one demo prompt, by kind (`reward_by_kind`)."""
    from rlhf.data import demo_task
    from rlhf.labelers import gold

    q = gold.parse_question(prompt)
    good = demo_task.answer_templates(q, q.answer)
    answers = {"concise correct": good[0], "wordy correct": good[-1], "non-answer: Hmm.": "Hmm.",
               "non-answer: empty": ""}  # fmt: skip
    # "Yes." answers a yes/no question (right, wrong, or invented about a creature nobody knows): a non-answer
    # only to the others
    asks_yes_no = q.family == "yesno" or "asked" in q.extra
    answers['bare "Yes." to a yes/no question' if asks_yes_no else "non-answer: Yes."] = "Yes."
    if q.family in ("arithmetic", "fact", "yesno", "unknown", "harm", "provocation"):
        answers["wrong / invented / complying / retort"] = demo_task.make_response(q, rng, wrong=True)
    return answers


def value_check_pairs() -> list[tuple[str, str, str, str]]:
    """(family, prompt, correct answer, wrong answer) over every arithmetic question of the demo world and every
    fact look-up: a correct answer against each wrong value of the kind the world's wrong answers take, in the
    same words (the bare value and the plain sentence)."""
    from rlhf.data import demo_task
    from rlhf.labelers import gold

    questions = [f"What is {a} {op} {b}?" for op in demo_task.OPERATIONS for a in range(demo_task.MAX_OPERAND + 1)
                 for b in range(demo_task.MAX_OPERAND + 1) if not (op == "minus" and b > a)]  # fmt: skip
    questions += [t.format(c) for t in ("What color is the {}?", "Where does the {} live?", "What does the {} eat?")
                  for c in sorted(demo_task.FACTS)]  # fmt: skip
    pairs: list[tuple[str, str, str, str]] = []
    for text in questions:
        prompt = demo_task.render_prompt(text)
        q = gold.parse_question(prompt)
        if q.family == "arithmetic":
            wrong = sorted({str(int(q.answer) + d) for d in (-3, -2, -1, 1, 2, 3)} - {q.answer}, key=int)
            wrong = [w for w in wrong if int(w) >= 0]
        else:
            wrong = [v for v in demo_task.VALUES[q.attribute] if v != q.answer]
        for w in wrong:
            for right_text, wrong_text in list(zip(demo_task.answer_templates(q, q.answer),
                                                   demo_task.answer_templates(q, w), strict=True))[:2]:  # fmt: skip
                pairs.append((q.family, prompt, " " + right_text, " " + wrong_text))
    return pairs


def reward_value_check(reward_model: Path, policy: Path | None = None) -> dict[str, Any]:
    """Can the reward model check an answer's value? Over `value_check_pairs`, how often it scores the correct
    answer higher (0.5: it cannot tell them apart). With `policy` (the SFT policy the reward model starts from),
    how often that policy's own likelihood puts the correct one higher: the knowledge a reward model could draw
    on."""
    pairs = value_check_pairs()
    prompts = [p for _, p, _, _ in pairs]
    right = reward_model_scores(reward_model, prompts, [r for _, _, r, _ in pairs])
    wrong_scores = reward_model_scores(reward_model, prompts, [w for _, _, _, w in pairs])
    if policy is not None:
        right_lp = _policy_loglik(policy, prompts, [r for _, _, r, _ in pairs])
        wrong_lp = _policy_loglik(policy, prompts, [w for _, _, _, w in pairs])
    out: dict[str, Any] = {}
    for family in ("arithmetic", "fact"):
        wins = [r > w for (f, *_), r, w in zip(pairs, right, wrong_scores, strict=True) if f == family]
        margins = [r - w for (f, *_), r, w in zip(pairs, right, wrong_scores, strict=True) if f == family]
        out[family] = {"pairs": len(wins), "correct_over_wrong": sum(wins) / len(wins),
                       "mean_margin": sum(margins) / len(margins)}  # fmt: skip
        if policy is not None:
            likelier = [r > w for (f, *_), r, w in zip(pairs, right_lp, wrong_lp, strict=True) if f == family]
            out[family]["policy_likelihood_correct_over_wrong"] = sum(likelier) / len(likelier)
    return out


def value_prior(reward_model: Path) -> dict[str, Any]:
    """The reward model's mean score of an arithmetic answer by the value it states, whatever the question: every
    arithmetic question of the demo world answered with every value from 0 to the largest result, in the bare value
    and the plain sentence (`by_value`: the mean score, and for how many of the questions that value is right). A
    reward model that cannot check values still scores some values above others; a policy trained against it
    drifts towards those (`arithmetic_values`)."""
    from rlhf.data import demo_task
    from rlhf.labelers import gold

    questions = [gold.parse_question(demo_task.render_prompt(f"What is {a} {op} {b}?"))
                 for op in demo_task.OPERATIONS for a in range(demo_task.MAX_OPERAND + 1)
                 for b in range(demo_task.MAX_OPERAND + 1) if not (op == "minus" and b > a)]  # fmt: skip
    values = [str(v) for v in range(max(int(q.answer) for q in questions) + 1)]
    prompts, texts, stated = [], [], []
    for q in questions:
        for v in values:
            for text in demo_task.answer_templates(q, v)[:2]:
                prompts.append(demo_task.render_prompt(q.text))
                texts.append(" " + text)
                stated.append(v)
    scores = reward_model_scores(reward_model, prompts, texts)
    by_value = {}
    for v in values:
        mine = [s for s, x in zip(scores, stated, strict=True) if x == v]
        by_value[v] = {"score": sum(mine) / len(mine), "right_for": sum(q.answer == v for q in questions)}
    return {"by_value": by_value}


def candidate_coverage(candidates_file: str) -> dict[str, Any]:
    """How often the SFT policy's K candidates hold a correct answer (what preferences can reward), and how
    often one sampled answer is correct, over the candidates' prompts by criterion."""
    from rlhf.labelers import gold
    from rlhf.labelers.panel import read_candidates

    rows = read_candidates(candidates_file)
    any_correct = n_correct = n_answers = 0
    for row in rows:
        flags = [gold.judge(row["prompt"], c["text"], c.get("finish_reason", "stop") == "stop").correct
                 for c in row["completions"]]  # fmt: skip
        any_correct += any(flags)
        n_correct += sum(flags)
        n_answers += len(flags)
    k = max(len(r["completions"]) for r in rows)
    return {"k": k, "prompts": len(rows), "correct_among_k": any_correct / len(rows),
            "correct_per_sample": n_correct / n_answers}  # fmt: skip


def label(out: Path, cfg: RootConfig) -> dict[str, Any]:
    """Candidates -> comparison tasks in the feedback store (SQLite) -> the simulated panel votes through the
    labeling app's HTTP API -> exported votes."""
    from rlhf.data.jsonl import write_jsonl
    from rlhf.feedback.db import Database, upgrade
    from rlhf.feedback.export import export_records
    from rlhf.feedback.importer import import_candidates, read_rows
    from rlhf.feedback.schemas import CandidateRow
    from rlhf.feedback.testing import run_server
    from rlhf.labelers.api_panel import label_through_api, panel_tokens
    from rlhf.labelers.panel import Panel

    db_url = f"sqlite:///{out / 'feedback.db'}"
    db = Database(db_url)
    panel = Panel.from_config(cfg.panel)
    try:
        upgrade(db)
        with db.session() as session:
            rows = read_rows(cfg.generate.out, CandidateRow, 1 << 30)
            imported = import_candidates(session, PROJECT, rows, task_kind=cfg.panel.task_kind, overlap=1)
        tokens = panel_tokens(db, panel, "demo panel")
        with run_server(db_url, votes_per_minute=0) as base_url:
            counts = label_through_api(base_url, tokens, panel, PROJECT)
        with db.session() as session:
            n = write_jsonl(
                cfg.reward.train_file,
                export_records(session, PROJECT, "votes" if cfg.panel.task_kind == "pairwise" else "ranking"),
            )
    finally:
        db.dispose()
    return {"tasks": imported.tasks, "votes": n, "votes_this_run": sum(counts.values())}


def summary_lines(out: Path) -> list[str]:
    """The terminal's closing summary: stage times, then the headline results, read from the run's files."""
    lines = [f"{'stage':>10}  seconds"]
    stages = Stages(out).done
    lines += [f"{name:>10}: {info['seconds']:7.1f}" for name, info in stages.items()]
    reward = stages.get("reward", {})
    if "rm_gold_accuracy" in reward:
        lines.append(f"reward model agrees with gold on {reward['rm_gold_accuracy']:.3f} of held-out pairs "
                     f"(the panel's own votes: {reward['panel_gold_agreement']:.3f})")  # fmt: skip
    coverage = out / "eval" / "sft_coverage.json"
    if coverage.exists():
        c = json.loads(coverage.read_text())
        lines.append(f"SFT candidates: a correct answer among K={c['k']} on {c['correct_among_k']:.3f} of prompts, "
                     f"{c['correct_per_sample']:.3f} of single answers")  # fmt: skip
    kinds = out / "eval" / "reward_by_kind.json"
    if kinds.exists():
        k = json.loads(kinds.read_text())
        lines.append("reward model, mean score (gold): " + ", ".join(
            f"{kind} {v['rm_mean']:.2f} ({v['gold_mean']:.2f})" for kind, v in k.items()))  # fmt: skip
    values = out / "eval" / "reward_values.json"
    if values.exists():
        v = json.loads(values.read_text())
        lines.append("reward model, correct over wrong value in the same words: " + ", ".join(
            f"{family} {c['correct_over_wrong']:.3f} ({c['pairs']} pairs)" for family, c in v.items()))  # fmt: skip
        if all("policy_likelihood_correct_over_wrong" in c for c in v.values()):
            lines.append("the SFT policy's own likelihood, correct over wrong: " + ", ".join(
                f"{family} {c['policy_likelihood_correct_over_wrong']:.3f}" for family, c in v.items()))  # fmt: skip
        by_value = v.get("arithmetic", {}).get("by_value")
        if by_value:
            ranked = sorted(by_value.items(), key=lambda kv: -kv[1]["score"])
            lines.append("reward model by the arithmetic value stated, whatever the question: " + ", ".join(
                f"{value} {b['score']:.2f}" for value, b in ranked[:3]) + f", ..., {ranked[-1][0]} {ranked[-1][1]['score']:.2f}")  # fmt: skip
    comparison = out / "eval" / "ppo_vs_sft.json"
    if comparison.exists():
        e = json.loads(comparison.read_text())
        (low, high), ppo, sft = e["ci95"], e["a"], e["b"]
        overlap = e.get("prompt_overlap")
        if overlap:
            lines.append(f"evaluation prompts: {overlap['prompts']} drawn apart from the training ones, {overlap['distinct']} "
                         f"distinct; the world's questions recur across draws: {overlap['in_ppo']} of them are among "
                         f"PPO's prompts, {overlap['in_sft']} among the SFT demonstrations'")  # fmt: skip
        lines += [
            f"PPO vs SFT under the gold judge, {e['n_prompts']} evaluation prompts: win rate {e['win_rate_a']:.3f} "
            f"(95% CI {low:.3f}-{high:.3f}), KL to SFT {ppo['kl_to_reference']:.2f} nats",
            f"{'':>14}  {'SFT':>7}  {'PPO':>7}",
            *(f"{label:>14}  {sft[key]:7.3f}  {ppo[key]:7.3f}" for label, key in
              [("correct", "correct_rate"), ("on questions", "correct_question_rate"),
               ("non-responsive", "non_responsive_rate"),
               ("hallucinated", "hallucinated_rate"), ("harmful", "harmful_rate"), ("toxic", "toxic_rate"),
               ("words", "mean_words"), ("EOS", "eos_rate")]
              if sft.get(key) is not None and ppo.get(key) is not None),  # an earlier build's eval has fewer
        ]  # fmt: skip
        if "by_family" in e:
            lines.append(f"win rate a policy with a best answer to every prompt would get: {e['ceiling_win_rate']:.3f}; "
                         "W/T/L by family: " + ", ".join(f"{f} {v['wins_a']}/{v['ties']}/{v['losses_a']}"
                                                         for f, v in e["by_family"].items()))  # fmt: skip
        if rt := e.get("redteam"):
            lines.append("red-team attack success under gold (harmful or toxic), SFT -> PPO: " + ", ".join(
                f"{label} {rt['b'][key]['attack_success_rate']:.3f} -> {rt['a'][key]['attack_success_rate']:.3f}"
                for key, label in (("heldout", "held-out seeds"), ("heldout_mutations", "their mutations"))
                if rt["a"][key]["answers"]))  # fmt: skip
    if (out / "report.html").exists():
        lines.append(f"report: {out / 'report.html'}")
    return lines


def run(
    out: Path,
    fast: bool = False,
    config: Path | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
) -> Stages:
    from rlhf.data import demo_task
    from rlhf.eval import report
    from rlhf.stages import generate, pretrain, sft

    cfg = demo_config(out, fast, config, overrides or [])
    stages = Stages(out, cfg)
    stages.check_settings()
    out.mkdir(parents=True, exist_ok=True)

    def data() -> dict[str, Any]:
        # the data section's fields are generate's arguments, by name
        demo_task.generate(out / "data", **cfg.data.model_dump())
        counts = json.loads((out / "data" / "manifest.json").read_text())["counts"]
        return {"pretrain_docs": counts["pretrain"], "sft_demonstrations": counts["sft"]}

    stages.run("data", data)
    stages.run("pretrain", lambda: pretrain.run(cfg.pretrain, resume=True, quiet=quiet))
    stages.run("sft", lambda: sft.run(cfg.sft, resume=True, quiet=quiet))
    stages.run("generate", lambda: generate.run(cfg.generate))
    stages.run("label", lambda: label(out, cfg))
    stages.run("reward", lambda: train_reward(cfg, quiet))
    for member in range(1, len(cfg.ppo.reward_ensemble) + 1):
        stages.run(f"reward-{member}", lambda member=member: train_reward_member(cfg, member, quiet))  # type: ignore[misc]
    stages.run("ppo", lambda: train_ppo(cfg, quiet))
    stages.run("eval", lambda: evaluate(out, cfg))
    stages.run("report", lambda: {"path": str(report.write_demo_report(out))})
    return stages
