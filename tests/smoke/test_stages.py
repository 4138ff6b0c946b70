"""Pretraining and SFT on a tiny model: learning, resume, data parallelism, the CLI and its errors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.labelers import gold
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.runs import read_metrics
from rlhf.train.demonstrations import read_demonstrations, tokenize_demonstrations
from rlhf.train.lm_loop import NextTokenLoss, collate, evaluate
from tests.archs import save_tiny
from tests.cli import launch_two, run_cli

from .conftest import TINY

runner = CliRunner()


def sft_args(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    sets = [s for s in TINY if s.startswith("sft.")]
    sets += [f"sft.model={tiny['pretrain']}", f"sft.train_file={tiny['data'] / 'sft.jsonl'}", *extra]
    return ["sft", "--quiet", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


def test_sft_response_loss_is_clearly_below_the_pretrained_model(tiny_demo: dict[str, Path]) -> None:
    tok = load_tokenizer(str(tiny_demo["sft"]))
    held_out = read_demonstrations(tiny_demo["data"] / "sft.jsonl", tok)[:30]  # the split SFT held out
    examples, _, _ = tokenize_demonstrations(held_out, tok, 64)
    pretrained, sft = (NextTokenLoss(load_causal_lm(str(tiny_demo[k]))) for k in ("pretrain", "sft"))
    padded = partial(collate, pad_id=tok.pad_token_id)
    before = evaluate(pretrained, examples, padded, 16)["loss"]
    after = evaluate(sft, examples, padded, 16)["loss"]
    assert after < 0.85 * before, (before, after)


def test_sft_samples_are_answers_that_end_with_eos(tiny_demo: dict[str, Path]) -> None:
    summary = json.loads((tiny_demo["root"] / "sft" / "summary.json").read_text())
    samples = [
        json.loads(line) for line in (tiny_demo["root"] / "sft" / "samples.jsonl").read_text().splitlines()
    ]
    assert summary["sample_eos_rate"] >= 0.8
    judged = [gold.judge(s["prompt"], s["response"], s["ended"]) for s in samples]
    well_formed = [j.ended and not j.repetitive and j.n_words > 0 for j in judged]
    assert sum(well_formed) / len(judged) >= 0.7


def test_resume_continues_with_the_same_losses(tiny_demo: dict[str, Path], tmp_path: Path) -> None:
    full = tmp_path / "full"
    result = runner.invoke(
        app, sft_args(tiny_demo, full, "sft.max_steps=8", "sft.save_every=4", "sft.log_every=1")
    )
    assert result.exit_code == 0, result.output
    # an interrupted copy: the step-4 checkpoint survives, what came after it is lost
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000008")
    shutil.rmtree(cut / "final")
    result = runner.invoke(
        app, [*sft_args(tiny_demo, cut, "sft.max_steps=8", "sft.save_every=4", "sft.log_every=1"), "--resume"]
    )
    assert result.exit_code == 0, result.output

    def losses(run):
        return {r["step"]: r["sft/loss"] for r in read_metrics(run / "metrics.jsonl") if "sft/loss" in r}  # noqa: E731

    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))  # the resumed file reads as one run
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-4)


def test_lora_sft_trains_adapters_merges_them_and_resumes(tiny_demo: dict[str, Path], tmp_path: Path) -> None:
    """`sft.lora.r`: adapters on the frozen model, checkpoints of the adapters alone, a merged final checkpoint
    whose held-out loss is below the pretrained model's; an interrupted run resumes on the same losses."""
    sets = ("sft.lora.r=8", "sft.lora.alpha=16", "sft.lr=1e-2", "sft.max_steps=16", "sft.save_every=8",
            "sft.log_every=1")  # fmt: skip
    full = tmp_path / "full"
    result = runner.invoke(app, sft_args(tiny_demo, full, *sets))
    assert result.exit_code == 0, result.output
    checkpoint = full / "checkpoints" / "step-0000008"
    assert (checkpoint / "adapter_config.json").exists() and not (checkpoint / "model.safetensors").exists()
    assert not (full / "final" / "adapter_config.json").exists()  # a plain Hugging Face checkpoint
    pretrained, final = load_causal_lm(str(tiny_demo["pretrain"])), load_causal_lm(str(full / "final"))
    before, after = pretrained.state_dict(), final.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), sorted(
        changed
    )  # the adapted layers only

    tok = load_tokenizer(str(tiny_demo["sft"]))
    examples, _, _ = tokenize_demonstrations(
        read_demonstrations(tiny_demo["data"] / "sft.jsonl", tok)[:30], tok, 64
    )
    padded = partial(collate, pad_id=tok.pad_token_id)
    loss = {
        k: evaluate(NextTokenLoss(m), examples, padded, 16)["loss"]
        for k, m in (("before", pretrained), ("after", final))
    }
    assert loss["after"] < 0.98 * loss["before"], loss  # 0.96 in one run of this test

    cut = tmp_path / "cut"  # interrupted after the step-8 checkpoint
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000016")
    shutil.rmtree(cut / "final")
    result = runner.invoke(app, [*sft_args(tiny_demo, cut, *sets), "--resume"])
    assert result.exit_code == 0, result.output

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["sft/loss"] for r in read_metrics(run / "metrics.jsonl") if "sft/loss" in r}

    a, b = losses(full), losses(cut)
    assert sorted(b) == list(range(1, 17))
    for step in range(9, 17):
        assert b[step] == pytest.approx(a[step], rel=1e-4)


def test_lora_checkpoints_leave_out_the_embeddings_grown_for_a_pad(
    tiny_demo: dict[str, Path], tmp_path: Path
) -> None:
    """A tokenizer without PAD grows the embeddings by a row; they stay frozen under LoRA, so a checkpoint holds
    the adapters alone, and a resumed run grows the loaded model's embeddings again, to the same losses."""
    model = save_tiny("qwen2", tmp_path / "model")
    sets = (f"sft.train_file={tiny_demo['data'] / 'sft.jsonl'}", "sft.lora.r=4", "sft.max_steps=4",
            "sft.save_every=2", "sft.log_every=1", "sft.batch_size=4", "sft.micro_batch_size=4")  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert one_step_sft(full, model, *sets).exit_code == 0
    adapter = safetensors.torch.load_file(full / "checkpoints" / "step-0000002" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter), sorted(adapter)
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    shutil.rmtree(cut / "final")
    args = [a for s in (f"sft.model={model}", "sft.precision=fp32", *sets) for a in ("--set", s)]
    result = runner.invoke(app, ["sft", "--quiet", "--resume", "--out", str(cut), *args])
    assert result.exit_code == 0, result.output

    def losses(run: Path) -> list[float]:
        return [r["sft/loss"] for r in read_metrics(run / "metrics.jsonl") if "sft/loss" in r]

    assert len(losses(cut)) == 4
    assert losses(cut) == pytest.approx(losses(full), rel=1e-5)
    grown = load_causal_lm(str(cut / "final")).get_input_embeddings().weight.shape[0]
    assert grown == load_causal_lm(str(model)).get_input_embeddings().weight.shape[0] + 1


def test_two_processes_follow_the_same_loss_curve_as_one(tiny_demo: dict[str, Path], tmp_path: Path) -> None:
    curves = {}
    for n in (1, 2):
        out = tmp_path / f"np{n}"
        args = sft_args(
            tiny_demo,
            out,
            "sft.max_steps=4",
            "sft.log_every=1",
            "sft.micro_batch_size=4",
            "sft.eval_fraction=0",
        )
        if n == 1:
            proc = run_cli(*args)
        else:
            # accelerate's multi-process launcher is --multi_gpu; with no GPU it runs the processes on the CPU (gloo)
            cmd = launch_two("-m", "rlhf.cli", *args)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((out / "summary.json").read_text())["processes"] == n
        curves[n] = [r["sft/loss"] for r in read_metrics(out / "metrics.jsonl") if "sft/loss" in r]
    assert len(curves[1]) == len(curves[2]) == 4
    assert curves[2] == pytest.approx(curves[1], rel=1e-4)


def test_pretrain_cli_writes_run_dir(tiny_demo: dict[str, Path], tmp_path: Path) -> None:
    sets = [s for s in TINY if s.startswith("pretrain.")] + [
        f"pretrain.train_file={tiny_demo['data'] / 'pretrain.txt'}",
        "pretrain.max_steps=3",
    ]
    result = runner.invoke(
        app, ["pretrain", "--quiet", "--out", str(tmp_path / "pt"), *[a for s in sets for a in ("--set", s)]]
    )
    assert result.exit_code == 0, result.output
    assert "held-out loss" in result.output
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "final/model.safetensors",
        "final/tokenizer.json",
    ):
        assert (tmp_path / "pt" / name).exists(), name
    assert "max_steps: 3" in (tmp_path / "pt" / "config.yaml").read_text()
    assert load_causal_lm(str(tmp_path / "pt" / "final")).config.hidden_size == 48


def test_bad_input_is_one_line_and_leaves_no_checkpoint(tiny_demo: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "User: Hi\\nAssistant:", "response": " Hello!"}\n{"prompt": "x"\n')
    proc = run_cli(
        "sft",
        "--out",
        str(tmp_path / "run"),
        "--set",
        f"sft.model={tiny_demo['sft']}",
        "--set",
        f"sft.train_file={bad}",
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: {bad}:2: not valid JSON (Expecting ',' delimiter at character 16)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )

    proc = run_cli(
        "pretrain", "--out", str(tmp_path / "pt"), "--set", f"pretrain.train_file={tmp_path / 'missing.txt'}"
    )
    assert (
        proc.returncode == 1 and proc.stderr.strip() == f"error: {tmp_path / 'missing.txt'}: file not found"
    )


def test_a_setting_refused_after_set_up_leaves_the_earlier_run_as_it_was(
    tiny_demo: dict[str, Path], tmp_path: Path
) -> None:
    """Errors found once the run directory is set up (a batch larger than the data, a model of the wrong kind)
    leave no new run directory, and an earlier run in it keeps its checkpoints, metrics and config."""
    data = tiny_demo["data"] / "sft.jsonl"
    sets = ["--set", f"sft.model={tiny_demo['sft']}", "--set", f"sft.train_file={data}", "--set", "sft.max_steps=1",
            "--set", "sft.batch_size=4", "--set", "sft.micro_batch_size=4", "--set", "sft.eval_fraction=0"]  # fmt: skip
    out = tmp_path / "run"
    assert run_cli("sft", "--quiet", "--out", str(out), *sets).returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_cli("sft", "--quiet", "--out", str(out), *sets, "--set", "sft.batch_size=100000")
    assert proc.returncode == 1 and "sft.batch_size (100000) is larger than the training set" in proc.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    reward_model = tmp_path / "rm"  # the policy with a scalar head: a reward model where a policy belongs
    AutoModelForSequenceClassification.from_pretrained(tiny_demo["sft"], num_labels=1).save_pretrained(
        reward_model
    )
    AutoTokenizer.from_pretrained(tiny_demo["sft"]).save_pretrained(reward_model)
    proc = run_cli(
        "sft", "--quiet", "--out", str(tmp_path / "new"), *sets, "--set", f"sft.model={reward_model}"
    )
    assert (
        proc.returncode == 1
        and "is a reward model or critic" in proc.stderr
        and not (tmp_path / "new").exists()
    )

    proc = run_cli("sft", "--set", "sft.lr=-1")
    assert proc.returncode == 1 and "sft.lr: Input should be greater than 0" in proc.stderr

    # a tokenizer whose PAD is EOS, with adding a PAD turned off
    model_dir = tmp_path / "padeos"
    shutil.copytree(tiny_demo["sft"], model_dir)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["pad_token"] = cfg["eos_token"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    proc = run_cli(
        "sft",
        "--out",
        str(tmp_path / "r2"),
        "--set",
        f"sft.model={model_dir}",
        "--set",
        f"sft.train_file={tiny_demo['data'] / 'sft.jsonl'}",
        "--set",
        "sft.add_pad_token=false",
    )
    assert proc.returncode == 1 and "uses EOS (id 0) as PAD" in proc.stderr
    assert "set add_pad_token: true" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_help_lists_stages_and_documents_options() -> None:
    top = runner.invoke(app, ["--help"])
    for stage in ("data", "pretrain", "sft"):
        assert stage in top.output
    sft_help = runner.invoke(app, ["sft", "--help"]).output
    for option in ("--config", "--set", "--out", "--resume", "--quiet"):
        assert option in sft_help


@pytest.mark.parametrize(
    "command, section",
    [(["pretrain"], "pretrain"), (["sft"], "sft"), (["generate"], "generate"), (["reward"], "reward"),
     (["ppo"], "ppo"), (["dpo"], "dpo"), (["bon"], "bon"), (["eval"], "eval"), (["redteam"], "redteam"),
     (["cai", "revise"], "cai"), (["cai", "label"], "cai"), (["loop"], "loop")],
)  # fmt: skip
def test_help_documents_every_setting_of_the_stage(command: list[str], section: str) -> None:
    from rlhf.config import RootConfig

    fields = RootConfig.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
    text = " ".join(runner.invoke(app, [*command, "--help"]).output.split())  # as one line: rich wraps it
    assert f"--set {section}.KEY=VALUE" in text
    # a nested section (lora, arch, normalise) as its own settings, dotted
    nested = {name: field.annotation.model_fields for name, field in fields.items()
              if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}  # fmt: skip
    settings = [(name, field) for name, field in fields.items() if name not in nested]
    settings += [(f"{name}.{sub}", field) for name, subs in nested.items() for sub, field in subs.items()]
    for name, field in settings:
        assert f" {name} = " in text, name  # each setting with its default ...
        if field.description:
            assert " ".join(field.description.split()[:3]) in text, name  # ... and what it does


def test_cai_label_help_documents_the_judge_settings_it_reads_from_eval() -> None:
    from rlhf.config import EvalConfig

    text = " ".join(runner.invoke(app, ["cai", "label", "--help"]).output.split())
    judge_keys = [name for name in EvalConfig.model_fields if name.startswith("judge")]
    assert "--set eval.KEY=VALUE" in text and len(judge_keys) > 10
    for name in judge_keys:
        assert f" {name} = " in text, name
    assert " prompts_file = " not in text.split("Also read")[1]  # eval's other settings are not cai's


def test_bon_n_zero_is_refused_not_replaced_by_the_default() -> None:
    result = runner.invoke(app, ["bon", "--n", "0"])
    assert result.exit_code != 0 and "bon.n: Input should be greater than or equal to 1" in str(
        result.exception
    )


def test_metrics_reach_tensorboard_through_accelerate(tiny_demo: dict[str, Path], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    args = sft_args(tiny_demo, out, "sft.max_steps=3", "sft.log_every=1", "sft.log_with=[tensorboard]")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (events,) = (out / "trackers" / "sft").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent)).Reload()
    logged = {r["step"]: r["sft/loss"] for r in read_metrics(out / "metrics.jsonl") if "sft/loss" in r}
    board = {e.step: e.value for e in acc.Scalars("sft/loss")}
    assert sorted(board) == sorted(logged) == [1, 2, 3]
    assert all(board[s] == pytest.approx(logged[s], rel=1e-6) for s in board)


def test_tensorboard_on_resume_and_over_an_earlier_run_holds_each_step_once(
    tiny_demo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed from step 2 of 4, the run logs steps 3 and 4 again: TensorBoard held them twice (metrics.jsonl,
    cut back to the checkpoint, once). A new run in the folder kept the earlier run's event files. The row's
    step is no scalar of its own. A tracker that is not installed was dropped with a warning at most."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf.train import common

    out = tmp_path / "tb"
    sets = (
        "sft.max_steps=4",
        "sft.log_every=1",
        "sft.save_every=2",
        "sft.eval_every=100",
        "sft.log_with=[tensorboard]",
    )
    assert runner.invoke(app, sft_args(tiny_demo, out, *sets)).exit_code == 0
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    assert runner.invoke(app, [*sft_args(tiny_demo, out, *sets), "--resume"]).exit_code == 0

    def steps(tag: str) -> list[int]:
        acc = EventAccumulator(str(out / "trackers" / "sft")).Reload()
        return sorted(e.step for e in acc.Scalars(tag)) if tag in acc.Tags()["scalars"] else []

    assert steps("sft/loss") == [1, 2, 3, 4] and steps("step") == []
    assert runner.invoke(app, sft_args(tiny_demo, out, "sft.max_steps=1", "sft.log_every=1",
                                       "sft.log_with=[tensorboard]")).exit_code == 0  # fmt: skip
    assert steps("sft/loss") == [1]
    monkeypatch.setattr(common, "_tracker_installed", lambda name: name != "wandb")
    result = runner.invoke(app, sft_args(tiny_demo, tmp_path / "wb", "sft.log_with=[tensorboard,wandb]"))
    assert result.exit_code != 0 and "log_with: wandb is not installed" in str(result.exception)


def test_the_logged_learning_rate_is_the_one_the_step_trained_at(
    tiny_demo: dict[str, Path], tmp_path: Path
) -> None:
    """Warm-up over 10 steps to 1e-3: step 1 trains at 1e-4, step 2 at 2e-4 (the log read the schedule after it
    had moved on, one step ahead)."""
    sets = ("sft.lr=1e-3", "sft.warmup_steps=10", "sft.max_steps=2", "sft.log_every=1", "sft.eval_every=100")
    assert runner.invoke(app, sft_args(tiny_demo, tmp_path / "lr", *sets)).exit_code == 0
    logged = [r["sft/lr"] for r in read_metrics(tmp_path / "lr" / "metrics.jsonl") if "sft/lr" in r]
    assert logged == pytest.approx([1e-4, 2e-4])


def test_redteam_filter_options_without_filter_are_refused() -> None:
    result = runner.invoke(app, ["redteam", "--filter-list", "list.jsonl"])
    assert result.exit_code != 0 and "go with --filter FILE" in str(result.exception)


def one_step_sft(out: Path, model: Path, *sets: str) -> Any:
    """`rlhf sft` of one step of one demonstration in fp32, with `sets` (train_file and the rest) added."""
    base = ("sft.batch_size=1", "sft.micro_batch_size=1", "sft.max_steps=1", "sft.precision=fp32")
    args = [a for s in (f"sft.model={model}", *base, *sets) for a in ("--set", s)]
    return runner.invoke(app, ["sft", "--quiet", "--out", str(out), *args])


def test_sft_on_a_single_demonstration_trains_on_it(tmp_path: Path) -> None:
    model = save_tiny("llama", tmp_path / "model")
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "User: Hi\nAssistant:", "response": " Hello!"}) + "\n")
    result = one_step_sft(tmp_path / "run", model, f"sft.train_file={data}")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "sft/loss" in r] == [1]


def test_a_training_step_whose_gradient_is_not_finite_stops_the_run_before_any_weight_takes_it(
    tmp_path: Path,
) -> None:
    """A diverged run (here a weight already infinite) took the NaN step, went on and saved a NaN model as its
    final/ with exit status 0."""
    from rlhf.models.loading import load_causal_lm

    model_dir = save_tiny("llama", tmp_path / "model")
    model = load_causal_lm(str(model_dir))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(model_dir)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "User: Hi\nAssistant:", "response": " Hello!"}) + "\n")
    result = one_step_sft(tmp_path / "run", model_dir, f"sft.train_file={data}")
    assert result.exit_code == 1
    assert str(result.exception).startswith("sft: step 1: the gradient norm is nan: training diverged")
    assert not (tmp_path / "run" / "final").exists()


def test_sft_says_how_many_held_out_demonstrations_were_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = save_tiny("llama", tmp_path / "model")
    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    data.write_text(json.dumps({"prompt": "User: Hi\nAssistant:", "response": " Hello!"}) + "\n")
    long = {"prompt": "User: " + "Hi " * 40 + "\nAssistant:", "response": " Hello!"}
    held.write_text(json.dumps(long) + "\n" + data.read_text())
    with caplog.at_level("WARNING", logger="rlhf.stages.sft"):
        result = one_step_sft(tmp_path / "run", model, f"sft.train_file={data}", f"sft.eval_file={held}",
                              "sft.max_seq_len=32")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "1 of 2 held-out demonstrations are longer than 32 tokens: 0 cut at the end of their response, 1 dropped"
        in caplog.text
    )


def test_sft_columns_train_on_alpaca_rows(tmp_path: Path) -> None:
    """`sft.columns` renames the train and eval files' columns, as `reward.columns` does the preference files'."""
    model = save_tiny("llama", tmp_path / "model")
    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    data.write_text(
        json.dumps({"instruction": "User: Hi\nAssistant:", "input": "", "output": " Hello!"}) + "\n"
    )
    held.write_text(
        json.dumps({"instruction": "User: Thank you.\nAssistant:", "output": " You are welcome."}) + "\n"
    )
    files = (f"sft.train_file={data}", f"sft.eval_file={held}")
    result = one_step_sft(
        tmp_path / "run", model, *files, "sft.columns={prompt: instruction, completion: output}"
    )
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "sft/loss" in r] == [1]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["User: Thank you.\nAssistant:"]  # the held-out file, mapped too
    # without the mapping, the error names the keys the row has
    result = one_step_sft(tmp_path / "run2", model, *files)
    assert result.exit_code != 0
    assert str(result.exception) == (
        f"{data}:1: missing field 'prompt' (or 'messages' or 'text'); the row's keys are 'instruction', 'input', "
        "'output'"
    )


def test_pretrain_with_held_out_documents_too_short_for_a_block_says_so(
    tiny_demo: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The held-out documents were taken out of training and gave no held-out loss (NaN), without a word; and
    the tokenizer trained on the corpus says its size (a small corpus makes fewer tokens than vocab_size)."""
    short = tmp_path / "short.txt"
    short.write_text("Hi.\n")
    sets = [s for s in TINY if s.startswith("pretrain.")] + [
        f"pretrain.train_file={tiny_demo['data'] / 'pretrain.txt'}", f"pretrain.eval_file={short}",
        "pretrain.max_steps=1",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="rlhf.stages.pretrain"):
        result = runner.invoke(
            app,
            ["pretrain", "--quiet", "--out", str(tmp_path / "pt"), *[a for s in sets for a in ("--set", s)]],
        )
    assert result.exit_code == 0, result.output
    assert "hold too little text for one block" in caplog.text
    tokens = len(load_tokenizer(str(tmp_path / "pt" / "final")))
    assert (
        f"a tokenizer of {tokens} tokens trained on the corpus" in caplog.text
    )  # its size, which may differ
