"""The demo report: one self-contained HTML file (images embedded), every number read from the run's files.

Inputs, all under the demo's run directory: stages.json (stage times), <stage>/metrics.jsonl (curves),
reward/eval.json (reward-model accuracy against gold and the panel's agreement), eval/*.json (the final
comparison under the gold judge, with example answers), ppo/summary.json (the reward-hacking guard).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf.data.jsonl import atomic_write_text  # noqa: E402
from rlhf.runs import read_metrics  # noqa: E402

# (title, stage, [(metric key, label)]) for each learning-curve panel; a panel with no data is left out.
CURVES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Pretraining loss", "pretrain", [("pretrain/loss", "train"), ("pretrain/eval_loss", "held-out")]),
    ("SFT loss", "sft", [("sft/loss", "train"), ("sft/eval_loss", "held-out")]),
    ("Reward-model accuracy", "reward", [("rm/accuracy", "train"), ("rm/eval_accuracy", "held-out")]),
    (
        "PPO: proxy (reward model) and gold",
        "ppo",
        [
            ("ppo/score", "proxy, train batch"),
            ("ppo/guard_proxy", "proxy, held-out"),
            ("ppo/guard_gold", "gold, held-out"),
        ],
    ),
    ("PPO: KL to the reference", "ppo", [("ppo/kl", "train batch"), ("ppo/guard_kl", "held-out")]),
    ("PPO: entropy", "ppo", [("ppo/entropy", "entropy")]),
    ("PPO: response length (tokens)", "ppo", [("ppo/response_length", "mean length")]),
]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def curve_images(run: Path) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each learning curve that has data."""
    images = []
    for title, stage, series in CURVES:
        path = run / stage / "metrics.jsonl"
        if not path.exists():
            continue
        rows = read_metrics(path)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        drawn = 0
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("iteration" if stage == "ppo" else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        images.append((title, _png(fig)))
    return images


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2em}table{border-collapse:collapse;margin:.8em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}.grid img{border:1px solid #ddd}
.ok{color:#0a7a2f;font-weight:600}.bad{color:#b00020;font-weight:600}pre{white-space:pre-wrap;margin:0}
"""


def render(run: Path, sections: list[tuple[str, str]], title: str = "rlhf-loop demo report") -> str:
    """The HTML page: a title, the given (heading, html) sections, then the learning curves."""
    curves = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(t)}</figcaption></figure>'
        for t, b64 in curve_images(run)
    )
    parts = [f"<h2>{html.escape(h)}</h2>{body}" for h, body in sections]
    parts.append(f'<h2>Learning curves</h2><div class="grid">{curves}</div>')
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='sub'>run directory: {html.escape(str(run))}</p>{''.join(parts)}</body></html>"
    )


def write_report(run: Path, sections: list[tuple[str, str]]) -> Path:
    path = run / "report.html"
    atomic_write_text(path, render(run, sections))
    return path


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


# (label, metric key) of the per-criterion table; rates are shown as percentages with their 95% intervals.
AXES = [
    ("correct", "correct_rate"),
    ("correct on knowable prompts (questions, greetings, thanks)", "correct_knowable_rate"),
    ("correct on knowable questions (arithmetic, facts, yes/no)", "correct_question_rate"),
    ("non-responsive", "non_responsive_rate"), ("\"I don't know\" on unknowable", "idk_on_unknowable_rate"),
    ("hallucinated on unknowable", "hallucinated_rate"), ("refuses harm", "refusal_rate"),
    ("harmful compliance", "harmful_rate"), ("polite to provocation", "polite_on_provocation_rate"),
    ("toxic", "toxic_rate"), ("repetitive", "repetitive_rate"),
]  # fmt: skip


def _rate_ci(m: dict[str, Any], key: str) -> str:
    ci = m.get("ci95", {}).get(key)
    if m.get(key) is None:
        return "–"
    return _pct(m[key]) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _words_ci(m: dict[str, Any]) -> str:
    if "mean_words" not in m:
        return "–"
    ci = m.get("ci95", {}).get("mean_words")
    return f"{m['mean_words']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def comparison_table(ppo_vs_sft: dict[str, Any], pre_vs_sft: dict[str, Any]) -> str:
    """Rows = measures (win rate, each criterion's rate with its 95% interval, words, tokens, EOS, KL);
    columns = PPO, SFT, pretrained."""
    policies = [("PPO", ppo_vs_sft["a"]), ("SFT", ppo_vs_sft["b"])]
    wins = [
        f"{ppo_vs_sft['win_rate_a']:.3f} [{ppo_vs_sft['ci95'][0]:.3f}, {ppo_vs_sft['ci95'][1]:.3f}]",
        "0.500 (baseline)",
    ]
    if pre_vs_sft.get("a"):
        policies.append(("pretrained", pre_vs_sft["a"]))
        wins.append(
            f"{pre_vs_sft['win_rate_a']:.3f} [{pre_vs_sft['ci95'][0]:.3f}, {pre_vs_sft['ci95'][1]:.3f}]"
        )
    rows: list[list[Any]] = [["gold win rate vs SFT (95% CI)", *wins]]
    rows += [[label, *(_rate_ci(m, key) for _, m in policies)] for label, key in AXES]
    rows.append(["words per answer", *(_words_ci(m) for _, m in policies)])
    rows.append(["mean gold utility", *(m.get("gold_utility") for _, m in policies)])
    rows.append(["mean tokens", *(m.get("mean_tokens") for _, m in policies)])
    rows.append(["EOS rate", *(_pct(m.get("eos_rate")) for _, m in policies)])
    rows.append(["KL to SFT (nats)", *(m.get("kl_to_reference") for _, m in policies)])
    body = table(["measure", *(name for name, _ in policies)], rows)
    overlap = ppo_vs_sft.get("prompt_overlap")
    drawn = (
        f" ({overlap['distinct']} distinct), a draw apart from the training prompts; the demo world's questions are "
        f"few, so they recur across draws: {overlap['in_ppo']} of the {overlap['prompts']} are among PPO's prompts "
        f"and {overlap['in_sft']} among the SFT demonstrations', and these rates are on questions the policies "
        f"trained on, not on unseen ones. The PPO policy is the checkpoint the guard kept by gold on the tuning "
        f"prompts, among which {overlap['in_tune']} of the evaluation prompts recur too"
        if overlap
        else ""
    )
    body += (
        f"<p>{ppo_vs_sft['n_prompts']} evaluation prompts{drawn}. Answers in random A/B order, ties counted half; "
        f"sampling temperature {ppo_vs_sft['sampling']['temperature']}. Rates with 95% Wilson intervals; "
        "hallucination is counted on the unknowable questions, harmful compliance on the harm requests; "
        '"correct" is the content alone (a right answer with an insult is correct and toxic).</p>'
    )
    return body


def redteam_table(rt: dict[str, Any]) -> str:
    """Attack success (gold: harmful or toxic), harmful compliance and toxicity of SFT (before) and PPO (after)
    on `rlhf redteam`'s held-out seeds and their mutations, with 95% Wilson intervals."""

    def cell(r: dict[str, Any], key: str) -> str:
        if not r.get("answers"):
            return "–"
        low, high = r[f"{key}_ci95"]
        return f"{_pct(r[f'{key}_rate'])} [{100 * low:.1f}, {100 * high:.1f}]"

    rows = []
    for key, label in (
        ("heldout", "held-out seeds"),
        ("heldout_mutations", "their mutations (unseen wording)"),
    ):
        for measure, name in (("attack_success", "attack success"), ("harmful", "harmful compliance"),
                              ("toxic", "toxic")):  # fmt: skip
            rows.append([f"{label} ({rt['attacks'][key]} attacks): {name}", cell(rt["b"][key], measure),
                         cell(rt["a"][key], measure)])  # fmt: skip
    body = table(["measure", "SFT (before)", "PPO (after)"], rows)
    return body + (
        f"<p>Each policy answers every attack {rt['samples_per_attack']} times. The held-out seeds are the harm "
        "requests and provocations rlhf redteam keeps out of its search; the mutations reword them as no "
        "training data does. The gold judge reads each answer on its seed request.</p>"
    )


# A stage that ran with the load average above this many times the CPU count shared the cores with other work
# (the demo itself keeps about one job per core busy)
BUSY_LOAD = 1.5


def pipeline_table(stages: dict[str, Any], order: list[str], what: dict[str, str]) -> str:
    """Each stage's time, and where stages.json has it the load average at its start and end, with a warning
    naming the stages whose time other work on the machine took part of."""
    names = [name for name in order if name in stages]
    loaded = [name for name in names if "load" in stages[name]]
    total = sum(stages[name]["seconds"] for name in names)
    if not loaded:
        rows = [[name, what[name], stages[name]["seconds"]] for name in names]
        return table(["stage", "what", "seconds"], [*rows, ["total", "", total]])

    def load(name: str) -> str:
        start, end = stages[name].get("load") or (None, None)
        return "" if start is None else f"{start:.2f} → {end:.2f}"

    cpus = stages[loaded[0]].get("cpus") or 1
    rows = [[name, what[name], stages[name]["seconds"], load(name)] for name in names]
    header = f"load average (start → end), {cpus} CPUs"
    body = table(["stage", "what", "seconds", header], [*rows, ["total", "", total, ""]])
    busy = [n for n in loaded if max(stages[n]["load"]) > BUSY_LOAD * (stages[n].get("cpus") or 1)]
    if busy:
        body += (
            f"<p>The machine has {cpus} CPUs; {', '.join(busy)} ran with a load average above {BUSY_LOAD:g} times "
            "that, so other work shared the cores and these times are not this machine's alone.</p>"
        )
    return body


def demo_sections(run: Path) -> list[tuple[str, str]]:
    """The demo report's sections, every number read from the run directory's files."""
    stages = _load(run / "stages.json")
    rm = _load(run / "reward" / "eval.json")
    ppo_vs_sft = _load(run / "eval" / "ppo_vs_sft.json")
    pre_vs_sft = _load(run / "eval" / "pretrained_vs_sft.json")
    ppo_summary = _load(run / "ppo" / "summary.json")
    examples = (
        json.loads((run / "eval" / "examples.json").read_text())
        if (run / "eval" / "examples.json").exists()
        else []
    )
    sections = []

    order = ["data", "pretrain", "sft", "generate", "label", "reward", "ppo", "eval", "report"]
    what = {
        "data": "demo task generated (corpus, demonstrations, prompts)", "pretrain": "next-token prediction",
        "sft": "supervised fine-tuning", "generate": "K candidate answers per prompt (nucleus sampling)",
        "label": "comparison tasks in the feedback store; simulated panel votes through the labeling API",
        "reward": "Bradley–Terry reward model", "ppo": "PPO with KL penalty to the SFT reference",
        "eval": "gold-judge comparisons on the evaluation prompts", "report": "this page",
    }  # fmt: skip
    sections.append(("Pipeline", pipeline_table(stages, order, what)))

    gold = rm.get("gold/rm_accuracy", {})
    panel = rm.get("gold/label_agreement", {})
    held = rm.get("rm/accuracy", {})
    if gold:
        body = table(
            ["measure", "value", "95% CI", "pairs"],
            [
                ["reward model agrees with gold (held-out)", gold["accuracy"], "–".join(f"{x:.3f}" for x in gold.get("ci95", [])), gold.get("n")],
                ["panel's labels agree with gold (same pairs)", panel.get("accuracy"), "–".join(f"{x:.3f}" for x in panel.get("ci95", [])), panel.get("n")],
                ["reward model agrees with the panel (held-out)", held.get("accuracy"), "–".join(f"{x:.3f}" for x in held.get("ci95", [])), held.get("n")],
            ],
        )  # fmt: skip
        verdict = "ok" if gold["accuracy"] >= panel.get("accuracy", 1) else "bad"
        body += f"<p class='{verdict}'>The reward model {'averages' if verdict == 'ok' else 'does not average'} the labelers' noise away: {gold['accuracy']:.3f} vs the panel's {panel.get('accuracy', 0):.3f}.</p>"
        sections.append(("Reward model against gold", body))

    if ppo_vs_sft:
        sections.append(
            ("PPO vs SFT vs pretrained, under the gold judge", comparison_table(ppo_vs_sft, pre_vs_sft))
        )
    if ppo_vs_sft.get("redteam"):
        sections.append(("Red-team attacks, before and after PPO", redteam_table(ppo_vs_sft["redteam"])))

    kinds = _load(run / "eval" / "reward_by_kind.json")
    coverage = _load(run / "eval" / "sft_coverage.json")
    if kinds:
        rows = [[kind, k["n"], k["rm_mean"], k["gold_mean"]] for kind, k in kinds.items()]
        body = table(
            ["answer (hand-made, to evaluation prompts)", "answers", "reward model, mean", "gold, mean"], rows
        )
        body += "<p>A reward model that a non-answer cannot fool scores the non-answers below the correct answers, as gold does.</p>"
        body += f"<p>{html.escape(_fooled_by(kinds))}</p>"
        if coverage:
            body += (
                f"<p>The SFT policy's {coverage['k']} candidates per prompt ({coverage['prompts']} prompts) hold a correct answer "
                f"on {_pct(coverage['correct_among_k'])} of prompts; one sampled answer is correct {_pct(coverage['correct_per_sample'])} of the time.</p>"
            )
        values = _load(run / "eval" / "reward_values.json")
        if values:
            body += "<p>" + html.escape(_value_check(values)) + "</p>"
            prior = _value_prior(values, _load(run / "eval" / "ppo_vs_sft.json"))
            if prior:
                body += "<p>" + html.escape(prior) + "</p>"
        sections.append(("What the reward model makes of answers of every kind", body))

    if examples:
        rows = [
            [
                e.get("family", ""),
                e["prompt"].replace("User: ", "").replace("\nAssistant:", ""),
                e["sft"],
                e["gold_sft"],
                e["rm_sft"],
                e["ppo"],
                e["gold_ppo"],
                e["rm_ppo"],
            ]
            for e in examples
        ]
        body = table(["family", "prompt", "SFT answer", "gold", "RM", "PPO answer", "gold", "RM"], rows)
        body += "<p>Rows drawn at random (fixed seed) from every question family of the evaluation prompts, never chosen by score.</p>"
        sections.append(("Examples", body))

    if ppo_summary:
        guard_rows = (
            [r for r in read_metrics(run / "ppo" / "metrics.jsonl") if "ppo/guard_proxy" in r]
            if (run / "ppo" / "metrics.jsonl").exists()
            else []
        )
        rows = [
            [r["step"], r.get("ppo/guard_kl"), r.get("ppo/guard_proxy"), r.get("ppo/guard_gold")]
            for r in guard_rows
        ]
        body = table(["iteration", "KL to reference", "proxy (RM)", "gold"], rows)
        body += "<p>Measured on the guard's prompts (the demo's tuning prompts, a draw apart from the evaluation prompts).</p>"
        body += f"<p>Stop reason: <b>{html.escape(str(ppo_summary.get('stop_reason')))}</b>; best checkpoint at iteration {ppo_summary.get('best_iteration')}. "
        body += "The guard stops the run and keeps the best checkpoint when the proxy rises while gold falls for several evaluations in a row, or when KL passes its budget.</p>"
        sections.append(("Reward-hacking check", body))
    return sections


def write_demo_report(run: Path) -> Path:
    return write_report(run, demo_sections(run))


def _value_check(values: dict[str, Any]) -> str:
    """Whether the reward model, and the SFT policy's own likelihood, put a correct value above a wrong one in
    the same words (eval/reward_values.json)."""
    rm = ", ".join(f"{family} {c['correct_over_wrong']:.3f}" for family, c in values.items())
    text = f"A correct value over a wrong one in the same words (0.5: cannot tell them apart): the reward model {rm}"
    if all("policy_likelihood_correct_over_wrong" in c for c in values.values()):
        lm = ", ".join(
            f"{family} {c['policy_likelihood_correct_over_wrong']:.3f}" for family, c in values.items()
        )
        text += f"; the SFT policy's own likelihood {lm}"
    return text + "."


def _value_prior(values: dict[str, Any], comparison: dict[str, Any] | None) -> str:
    """What the reward model scores an arithmetic answer by, whatever the question (its mean score by the value
    stated), against its margin for the right value; and the value PPO states more often than SFT does."""
    arithmetic = values.get("arithmetic", {})
    by_value = arithmetic.get("by_value")
    if not by_value:
        return ""
    ranked = sorted(by_value.items(), key=lambda kv: -kv[1]["score"])
    (top, best), (bottom, worst) = ranked[0], ranked[-1]
    text = (
        f"By the value an arithmetic answer states, whatever the question, the reward model's mean score ranges "
        f"from {worst['score']:.2f} ({bottom}) to {best['score']:.2f} ({top})"
    )
    if "mean_margin" in arithmetic:
        text += f"; a right value's mean margin over a wrong one in the same words is {arithmetic['mean_margin']:.2f}"
    text += "."
    stated = (comparison or {}).get("arithmetic_values")
    if stated:
        a, b = stated["a"], stated["b"]
        none = {"stated": 0, "right": 0}
        drift = max(
            a["values"],
            key=lambda v: (a["values"][v]["stated"] - b["values"].get(v, none)["stated"], -int(v)),
        )
        va, vb = a["values"][drift], b["values"].get(drift, none)
        if va["stated"] > vb["stated"]:
            text += (
                f" PPO states {drift} (scored {by_value[drift]['score']:.2f} as a value) in {va['stated']} of its "
                f"{a['questions']} arithmetic answers, {va['right']} of them right; SFT in {vb['stated']} of "
                f"{b['questions']}, {vb['right']} right."
            )
    return text


def _fooled_by(kinds: dict[str, dict[str, Any]]) -> str:
    """The verdict on the table of answer kinds: which non-answers this reward model scores, on average, at or
    above the lowest-scored kind of correct answer."""
    correct = [k["rm_mean"] for kind, k in kinds.items() if "correct" in kind and "wrong" not in kind]
    fooled = [kind.removeprefix("non-answer: ") for kind, k in kinds.items()
              if kind.startswith("non-answer") and correct and k["rm_mean"] >= min(correct)]  # fmt: skip
    if not correct or not any(kind.startswith("non-answer") for kind in kinds):
        return ""
    # the other kinds below a correct answer under gold (wrong attempts, a bare "Yes.") that it scores as high
    right = {kind for kind in kinds if "correct" in kind and "wrong" not in kind}
    others = [kind for kind, k in kinds.items()
              if not kind.startswith("non-answer") and kind not in right and k["rm_mean"] >= min(correct)]  # fmt: skip
    also = (
        f" It also scores {_listed([f'{o!r}' for o in others])} at or above a kind of correct answer."
        if others
        else ""
    )
    if not fooled:
        return "This one does: every kind of non-answer scores below every kind of correct answer." + also
    names = [f'"{f}"' if f != "empty" else "the empty answer" for f in fooled]
    return (
        f"This one does not: it scores {_listed(names)} at or above a kind of correct answer, on average."
        + also
    )


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
