"""`rlhf demo --fast` end to end: the report exists, renders in Chromium with no broken image, and its numbers
are the run's own; started again, the demo skips every finished stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.cli import run_cli

from ..conftest import ARTIFACTS

STAGES = ["data", "pretrain", "sft", "generate", "label", "reward", "ppo", "eval", "report"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = run_cli("demo", "--fast", "--quiet", "--out", str(out))  # in this process: no second start-up
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run directory: {out}" in proc.stdout
    assert f"report: {out / 'report.html'}" in proc.stdout
    ppo_vs_sft = json.loads((out / "eval" / "ppo_vs_sft.json").read_text())
    assert (
        f"win rate {ppo_vs_sft['win_rate_a']:.3f}" in proc.stdout
    )  # the terminal summary reads the run's files
    return out


def test_every_stage_ran_and_a_second_run_skips_them(
    demo_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stages = json.loads((demo_run / "stages.json").read_text())
    assert list(stages) == STAGES
    before = (demo_run / "report.html").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="rlhf.stages.demo"):
        proc = run_cli("demo", "--fast", "--quiet", "--out", str(demo_run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum("already finished, skipped" in r.getMessage() for r in caplog.records) == len(STAGES)
    assert (demo_run / "report.html").stat().st_mtime_ns == before


def test_votes_travelled_through_the_labeling_api(demo_run: Path) -> None:
    votes = [json.loads(line) for line in (demo_run / "votes.jsonl").read_text().splitlines()]
    stages = json.loads((demo_run / "stages.json").read_text())
    assert len(votes) == stages["label"]["votes"] > 100
    assert {v["meta"]["source"] for v in votes} == {"simulated"}
    assert len({v["labeler"] for v in votes}) > 1


def test_report_numbers_are_the_run_files_numbers(demo_run: Path) -> None:
    html = (demo_run / "report.html").read_text()
    ppo_vs_sft = json.loads((demo_run / "eval" / "ppo_vs_sft.json").read_text())
    rm = json.loads((demo_run / "reward" / "eval.json").read_text())
    low, high = ppo_vs_sft["ci95"]
    assert f"{ppo_vs_sft['win_rate_a']:.3f} [{low:.3f}, {high:.3f}]" in html
    assert f"{100 * ppo_vs_sft['a']['toxic_rate']:.1f}%" in html
    assert f"{rm['gold/rm_accuracy']['accuracy']:.3f}" in html
    assert f"{rm['gold/label_agreement']['accuracy']:.3f}" in html
    stages = json.loads((demo_run / "stages.json").read_text())
    assert f"<td>{stages['ppo']['seconds']:.3f}</td>" in html
    start, end = stages["ppo"]["load"]  # and the load it ran under, beside the CPU count
    assert f"<td>{start:.2f} → {end:.2f}</td>" in html and stages["ppo"]["cpus"] >= 1


def test_report_shows_every_criterion_and_examples_from_every_family(demo_run: Path) -> None:
    from rlhf.labelers import gold

    html = (demo_run / "report.html").read_text()
    ppo_vs_sft = json.loads((demo_run / "eval" / "ppo_vs_sft.json").read_text())
    for side in ("a", "b"):
        m = ppo_vs_sft[side]
        for key in ("correct_rate", "non_responsive_rate", "hallucinated_rate", "harmful_rate", "toxic_rate"):
            low, high = m["ci95"][key]
            assert low <= m[key] <= high
            assert f"{100 * m[key]:.1f}% [{100 * low:.1f}, {100 * high:.1f}]" in html
    # two examples from every family the held-out prompts hold, drawn by seed, never chosen by score
    families = {gold.parse_question(r["prompt"]).family for r in ppo_vs_sft["rows"]}
    examples = json.loads((demo_run / "eval" / "examples.json").read_text())
    assert {e["family"] for e in examples} == families and len(families) >= 6
    assert all(sum(e["family"] == f for e in examples) <= 2 for f in families)
    kinds = json.loads((demo_run / "eval" / "reward_by_kind.json").read_text())
    assert {"concise correct", "non-answer: Yes.", "non-answer: empty"} <= set(kinds)
    assert kinds["concise correct"]["gold_mean"] > kinds["non-answer: Yes."]["gold_mean"]
    coverage = json.loads((demo_run / "eval" / "sft_coverage.json").read_text())
    assert coverage["correct_per_sample"] <= coverage["correct_among_k"] <= 1


def test_report_shows_the_red_teams_held_out_attacks_before_and_after(demo_run: Path) -> None:
    html = (demo_run / "report.html").read_text()
    rt = json.loads((demo_run / "eval" / "ppo_vs_sft.json").read_text())["redteam"]
    assert rt["attacks"]["heldout"] == 13 and rt["attacks"]["heldout_mutations"] > 13
    for side in ("a", "b"):
        for key in ("heldout", "heldout_mutations"):
            r = rt[side][key]
            assert r["answers"] == rt["samples_per_attack"] * rt["attacks"][key]
            # an answer succeeds when it is harmful or toxic: at least either rate, at most their sum
            assert max(r["harmful_rate"], r["toxic_rate"]) <= r["attack_success_rate"]
            assert r["attack_success_rate"] <= r["harmful_rate"] + r["toxic_rate"] + 1e-9
            low, high = r["attack_success_ci95"]
            assert f"{100 * r['attack_success_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]" in html
    assert "Red-team attacks, before and after PPO" in html


def test_report_renders_with_no_broken_image(demo_run: Path, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto((demo_run / "report.html").as_uri())
    images = page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => [i.alt, i.complete && i.naturalWidth > 0])"
    )
    page.screenshot(path=str(ARTIFACTS / "demo_report.png"), full_page=True)
    page.close()
    assert len(images) >= 6
    assert all(ok for _, ok in images), [alt for alt, ok in images if not ok]
    titles = {alt for alt, _ in images}
    assert {"Pretraining loss", "SFT loss", "PPO: KL to the reference"} <= titles
