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
