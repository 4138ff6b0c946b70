"""The per-round table of an `rlhf loop` run, read from what the loop wrote (round-N/eval.json, the reward model's
eval.json, PPO's summary.json), as markdown; with --doc, into docs/loop.md between its markers.

    python -m benchmarks.loop_rounds runs/demo/loop [--doc] [--command "rlhf loop ..."] [--note "..."]

Rates are the gold judge's on the evaluation prompts the loop was given (`eval.prompts_file`), the SFT row from
the same evaluation's other side (round 1's), with the evaluation's sampling.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from benchmarks.common import replace_doc_section

DOC = Path(__file__).resolve().parents[1] / "docs" / "loop.md"
START, END = "<!-- loop_rounds:start -->", "<!-- loop_rounds:end -->"
AXES = [("correct_knowable_rate", "correct (knowable)"), ("non_responsive_rate", "non-responsive"),
        ("hallucinated_rate", "hallucinated"), ("harmful_rate", "harmful"), ("toxic_rate", "toxic")]  # fmt: skip


def rounds(loop_dir: Path) -> list[Path]:
    found = [p for p in loop_dir.glob("round-*") if re.fullmatch(r"round-\d+", p.name)]
    done = sorted((p for p in found if (p / "eval.json").exists()), key=lambda p: int(p.name.split("-")[1]))
    if not done:
        raise SystemExit(f"{loop_dir}: no round-N/eval.json (has the loop evaluated a round?)")
    return done


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def axis_cells(side: dict[str, Any]) -> list[str]:
    cells = [f"{side[key]:.1%}" if side.get(key) is not None else "-" for key, _ in AXES]
    return [*cells, f"{side['mean_words']:.2f}" if "mean_words" in side else "-"]


def table(loop_dir: Path) -> list[str]:
    done = rounds(loop_dir)
    head = ["round", "reward model: votes", "RM vs gold (held-out pairs)", "**gold win rate vs SFT** [95% CI]", "W/T/L",
            "KL to SFT", *(name for _, name in AXES), "words", "PPO stopped"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sft = read_json(done[0] / "eval.json")["b"]
    lines.append("| " + " | ".join(["SFT", "", "", "", "", "0", *axis_cells(sft), ""]) + " |")
    for rdir in done:
        ev = read_json(rdir / "eval.json")
        rm_eval, rm_sum = (
            read_json(rdir / "reward" / "eval.json"),
            read_json(rdir / "reward" / "summary.json"),
        )
        ppo = read_json(rdir / "ppo" / "summary.json")
        gold = rm_eval.get("gold/rm_accuracy")
        votes = sum(1 for _ in (rdir / "votes.jsonl").open()) if (rdir / "votes.jsonl").exists() else "-"
        lo, hi = ev["ci95"]
        stop = ppo.get("stop_reason", "-")
        if "best_iteration" in ppo and ppo.get("best_iteration", -1) >= 0:
            stop += f"; kept iteration {ppo['best_iteration']} of {ppo['iterations']}"
        lines.append("| " + " | ".join([
            rdir.name.split("-")[1], str(votes),
            f"{gold['accuracy']:.3f} ({gold['n']})" if gold else f"{rm_sum.get('rm/eval_accuracy', float('nan')):.3f} (panel)",
            f"**{ev['win_rate_a']:.3f}** [{lo:.3f}, {hi:.3f}]", f"{ev['wins_a']}/{ev['ties']}/{ev['losses_a']}",
            f"{ev['a']['kl_to_reference']:.2f}", *axis_cells(ev["a"]), stop,
        ]) + " |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("loop_dir", type=Path)
    parser.add_argument("--doc", action="store_true", help="write the table into docs/loop.md")
    parser.add_argument("--command", default="", help="the command that ran the loop, shown above the table")
    parser.add_argument("--note", default="", help="a line under the command: machine, date, what differs")
    args = parser.parse_args()
    lines = table(args.loop_dir)
    print("\n".join(lines))
    if args.doc:
        body = [START, *([f"Command: `{args.command}`", ""] if args.command else []),
                *([args.note, ""] if args.note else []), *lines, END]  # fmt: skip
        replace_doc_section(START, END, "\n".join(body), DOC)


if __name__ == "__main__":
    main()
