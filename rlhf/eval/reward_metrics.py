"""How good is a reward model on held-out comparisons: accuracy with a 95% interval, accuracy by labeler and
by margin or confidence, calibration of sigmoid(r_chosen - r_rejected), and reward histograms (a PNG).

No torch and no gold here: the training stage calls this with the rewards it computed. The comparison with
the demo task's gold utility lives in rlhf.eval.reward_eval, which only the CLI and tests import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf.data.jsonl import iter_jsonl, write_json, write_jsonl

EVAL_FILE, PAIRS_FILE, PLOT_FILE = "eval.json", "heldout_pairs.jsonl", "reward_eval.png"
CONFIDENCE_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class ScoredPair:
    """One held-out comparison with the reward model's raw (unnormalised) rewards."""

    prompt: str
    chosen: str
    rejected: str
    reward_chosen: float
    reward_rejected: float
    labeler: str | None = None
    margin: float | None = None

    @property
    def delta(self) -> float:
        return self.reward_chosen - self.reward_rejected

    @property
    def correct(self) -> bool:
        return self.delta > 0


def wilson_interval(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (Wilson 1927); (nan, nan) when n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clustered_wilson_interval(clusters: Sequence[tuple[int, int]], z: float = 1.96) -> tuple[float, float]:
    """Wilson interval of the pooled rate sum(k) / sum(n) over clusters of (successes k, trials n) whose trials
    are not independent (several answers to one prompt): Wilson's at the effective sample size n / deff. The
    design effect deff (Kish 1965) is the cluster-robust variance of the pooled rate over its binomial variance,
    never below 1, so clusters that vary no more than independent trials (clusters of one trial, among them)
    give Wilson's interval itself. With no success, or no failure, the trials cannot show how alike a cluster's
    are: the interval takes the largest design effect, the mean cluster size (trials as alike as can be, one
    observation a cluster), rather than the smallest. (nan, nan) when there are no trials."""
    n = sum(m for _, m in clusters)
    if n == 0:
        return float("nan"), float("nan")
    k = sum(y for y, _ in clusters)
    p = k / n
    if 0 < p < 1:
        robust = sum((y - p * m) ** 2 for y, m in clusters) / (n * n)
        deff = max(1.0, robust / (p * (1 - p) / n))
    else:
        deff = n / sum(1 for _, m in clusters if m)
    return wilson_interval(k / deff, n / deff, z)


def accuracy_summary(correct: Sequence[bool], groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """{"n", "accuracy", "ci95": [low, high]}: Wilson's interval, or, given each pair's group (its prompt: the
    pairs of one prompt are alike), the clustered one (`clustered_wilson_interval`)."""
    k, n = sum(correct), len(correct)
    if groups is None:
        low, high = wilson_interval(k, n)
    else:
        by_group: dict[Any, list[bool]] = {}
        for right, group in zip(correct, groups, strict=True):
            by_group.setdefault(group, []).append(right)
        low, high = clustered_wilson_interval([(sum(v), len(v)) for v in by_group.values()])
    return {"n": n, "accuracy": k / n if n else float("nan"), "ci95": [low, high]}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def calibration(deltas: Sequence[float], n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of the Bradley-Terry probability sigmoid(delta) (Guo et al. 2017).

    Each pair predicts "chosen wins" when delta > 0, with confidence sigmoid(|delta|) in [0.5, 1]; pairs are
    binned by confidence and ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|.
    """
    bins: list[dict[str, Any]] = []
    n = len(deltas)
    ece = 0.0
    for b in range(n_bins):
        low, high = 0.5 + 0.5 * b / n_bins, 0.5 + 0.5 * (b + 1) / n_bins
        members = [
            d
            for d in deltas
            if low <= sigmoid(abs(d)) < high or (b == n_bins - 1 and sigmoid(abs(d)) >= high)
        ]
        if not members:
            continue
        confidence = sum(sigmoid(abs(d)) for d in members) / len(members)
        accuracy = sum(d > 0 for d in members) / len(members)
        ece += len(members) / n * abs(accuracy - confidence)
        bins.append(
            {"low": low, "high": high, "n": len(members), "confidence": confidence, "accuracy": accuracy}
        )
    return {"ece": ece if n else float("nan"), "bins": bins}


def _bucketed(
    pairs: Sequence[ScoredPair], edges: Sequence[float], value: Callable[[ScoredPair], float]
) -> list[dict[str, Any]]:
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        last = high == edges[-1]
        inside = [p.correct for p in pairs if low <= value(p) < high or (last and value(p) == high)]
        if inside:
            rows.append({"low": low, "high": high, **accuracy_summary(inside)})
    return rows


def margin_edges(margins: Sequence[float], n_buckets: int = 4) -> list[float]:
    """Bucket edges at the quantiles of the margins (distinct values only, so few-valued margins stay whole)."""
    ordered = sorted(margins)
    edges = sorted(
        {ordered[min(len(ordered) - 1, int(q * len(ordered) / n_buckets))] for q in range(n_buckets)}
    )
    return [*edges, ordered[-1] + 1e-9]  # the last bucket includes the largest margin


def reward_report(pairs: Sequence[ScoredPair], shift: float = 0.0, scale: float = 1.0) -> dict[str, Any]:
    """All held-out metrics as one JSON-ready dict; rewards reported normalised by (shift, scale)."""
    by_labeler: dict[str, list[bool]] = {}
    for p in pairs:
        by_labeler.setdefault(p.labeler or "(anonymous)", []).append(p.correct)
    margins = [p.margin for p in pairs if p.margin is not None]
    report: dict[str, Any] = {
        "rm/accuracy": accuracy_summary([p.correct for p in pairs], [p.prompt for p in pairs]),
        "rm/by_labeler": {k: accuracy_summary(v) for k, v in sorted(by_labeler.items())},
        "rm/by_confidence": _bucketed(pairs, CONFIDENCE_EDGES, lambda p: sigmoid(abs(p.delta))),
        "rm/calibration": calibration([p.delta for p in pairs]),
        "rm/mean_reward_chosen": _mean([(p.reward_chosen - shift) / scale for p in pairs]),
        "rm/mean_reward_rejected": _mean([(p.reward_rejected - shift) / scale for p in pairs]),
        "rm/normalisation": {"shift": shift, "scale": scale},
    }
    if margins:
        with_margin = [p for p in pairs if p.margin is not None]
        report["rm/by_margin"] = _bucketed(
            with_margin, margin_edges(margins), lambda p: float(p.margin or 0.0)
        )
    return report


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def plot_rewards(
    pairs: Sequence[ScoredPair], path: str | Path, shift: float = 0.0, scale: float = 1.0
) -> None:
    """Two panels: histograms of chosen vs rejected rewards, and the reliability diagram of sigmoid(delta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    chosen = [(p.reward_chosen - shift) / scale for p in pairs]
    rejected = [(p.reward_rejected - shift) / scale for p in pairs]
    left.hist([chosen, rejected], bins=30, label=["chosen", "rejected"], alpha=0.7, histtype="stepfilled")
    left.set(xlabel="reward (normalised)", ylabel="completions", title="Held-out rewards")
    left.legend()
    bins = calibration([p.delta for p in pairs])["bins"]
    right.plot([0.5, 1.0], [0.5, 1.0], "k--", lw=1, label="perfect calibration")
    right.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label="reward model")
    right.set(
        xlabel="confidence sigmoid(|r_c - r_r|)", ylabel="accuracy", title="Calibration", xlim=(0.5, 1.0)
    )
    right.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reward_eval(
    run_dir: str | Path, pairs: Sequence[ScoredPair], shift: float = 0.0, scale: float = 1.0, **extra: Any
) -> dict[str, Any]:
    """RUN/heldout_pairs.jsonl (the scored pairs), RUN/eval.json (the report plus `extra`) and RUN/reward_eval.png."""
    run_dir = Path(run_dir)
    write_jsonl(run_dir / PAIRS_FILE, [asdict(p) for p in pairs])
    report = {**reward_report(pairs, shift, scale), **extra}
    write_json(run_dir / EVAL_FILE, report, strict=True)  # nothing held out: its means are null, not NaN
    if pairs:
        plot_rewards(pairs, run_dir / PLOT_FILE, shift, scale)
    return report


def read_scored_pairs(run_dir: str | Path) -> list[ScoredPair]:
    """RUN/heldout_pairs.jsonl as written by write_reward_eval (empty when nothing was held out)."""
    return [ScoredPair(**row) for _, row in iter_jsonl(Path(run_dir) / PAIRS_FILE)]
