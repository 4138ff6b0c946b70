"""rlhf/runs.py: a fresh run in a directory holding an earlier one starts clean; a resume says what changed."""

from __future__ import annotations

import fcntl
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlhf.config import DPOConfig, PPOConfig, SFTConfig
from rlhf.errors import RlhfError
from rlhf.runs import Run, read_metrics


@pytest.fixture(autouse=True)
def _no_unstarted_runs_left() -> Iterator[None]:
    """A run a test leaves unstarted must not be undone by a later test's error."""
    yield
    from rlhf import runs

    runs._unstarted.clear()


def earlier_run(out: Path, cfg: Any) -> Run:
    run = Run(out, cfg)
    for step in (150, 200):
        run.save_checkpoint(step, lambda d: (d / "model.txt").write_text("weights"), {"optimizer": {}})
        run.log(step, {"loss": 1.0})
    for name in ("final", "best"):
        (out / name).mkdir()
    (out / "summary.json").write_text("{}")
    (out / "cache.pt").write_text("stale")
    (out / "votes.jsonl").write_text("the user's own file\n")
    return run


def test_a_fresh_run_clears_an_earlier_one_and_keeps_what_is_not_a_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    cfg = SFTConfig(out_dir=str(out), lr=1e-3)
    earlier_run(out, cfg)
    with caplog.at_level(logging.WARNING, logger="rlhf.runs"):
        run = Run(out, cfg, records=("cache.pt",))
    assert "holds an earlier run" in caplog.text and "checkpoints" in caplog.text
    assert "its final/ is the earlier run's model" in caplog.text
    assert run.latest_checkpoint() is None and not run.metrics_path.exists()
    assert (
        not (out / "best").exists()
        and not (out / "summary.json").exists()
        and not (out / "cache.pt").exists()
    )
    assert (out / "final").exists() and (out / "votes.jsonl").read_text() == "the user's own file\n"
    # the new run's first checkpoint is the one kept, not pruned as the oldest
    run.save_checkpoint(2, lambda d: (d / "model.txt").write_text("new"), {"optimizer": {}})
    assert run.latest_checkpoint() == out / "checkpoints" / "step-0000002"


def test_a_resume_keeps_the_run_and_names_the_settings_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    earlier_run(out, SFTConfig(out_dir=str(out), lr=1e-3, max_steps=200))
    with caplog.at_level(logging.WARNING, logger="rlhf.runs"):
        run = Run(out, SFTConfig(out_dir=str(out), lr=3e-3, max_steps=400), resume=True)
    assert run.latest_checkpoint() == out / "checkpoints" / "step-0000200"
    assert "settings changed since the run started" in caplog.text
    assert "lr 0.001 -> 0.003" in caplog.text and "max_steps 200 -> 400" in caplog.text
    assert "holds an earlier run" not in caplog.text


@pytest.mark.parametrize(
    ("change", "shown"),
    [({"train_file": "other.jsonl"}, "train_file 'data/demo/sft.jsonl' -> 'other.jsonl'"), ({"seed": 1}, "seed 0 -> 1"),
     ({"lora": {"r": 8}}, "lora.r 0 -> 8")],
)  # fmt: skip
def test_a_resume_refuses_another_setting_of_what_the_run_trains_on(
    tmp_path: Path, change: dict[str, Any], shown: str
) -> None:
    """Another data file or seed would move the held-out split onto what the run trained on; adapters on a run
    that trained every weight would make two runs of one. The run is left as it was."""
    out = tmp_path / "run"
    earlier_run(out, SFTConfig(out_dir=str(out), max_steps=200))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    refused = f"was started with other settings of what it trains on \\({re.escape(shown)}\\)"
    with pytest.raises(RlhfError, match=refused):
        Run(out, SFTConfig(out_dir=str(out), max_steps=400, **change), resume=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # every process of a launch refuses, not the main one alone (the others went on to a traceback)
    with pytest.raises(RlhfError, match=refused):
        Run(out, SFTConfig(out_dir=str(out), max_steps=400, **change), is_main=False, resume=True)


@pytest.mark.parametrize(
    ("cls", "change", "shown"),
    [(PPOConfig, {"loss_aggregation": "seq_mean_token_sum_norm"},
      "loss_aggregation 'token_mean' -> 'seq_mean_token_sum_norm'"),
     (PPOConfig, {"grpo_scale_by_std": False}, "grpo_scale_by_std True -> False"),
     (PPOConfig, {"kl_in": "loss", "kl_estimator": "k3"}, "kl_in 'reward' -> 'loss'"),
     (DPOConfig, {"label_smoothing": 0.1}, "label_smoothing 0.0 -> 0.1")],
)  # fmt: skip
def test_a_resume_refuses_another_method(
    tmp_path: Path, cls: Any, change: dict[str, Any], shown: str
) -> None:
    """GRPO resumed as Dr. GRPO, or DPO as conservative DPO, would optimise two objectives in one run."""
    out = tmp_path / "run"
    earlier_run(out, cls(out_dir=str(out)))
    with pytest.raises(RlhfError, match=re.escape(shown)):
        Run(out, cls(out_dir=str(out), **change), resume=True)
    Run(out, cls(out_dir=str(out), lr=3e-4), resume=True)  # another step size is the same method


def test_a_run_resumed_before_its_first_checkpoint_logs_from_step_0_once(tmp_path: Path) -> None:
    """Interrupted before any checkpoint, a resumed run starts again at step 0: its file reads as one run."""
    out, cfg = tmp_path / "run", SFTConfig(out_dir=str(tmp_path / "run"))
    first = Run(out, cfg)
    for step in (0, 1):
        first.log(step, {"loss": 2.0})
    again = Run(out, cfg, resume=True)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]  # kept until it logs
    for step in (0, 1, 2):
        again.log(step, {"loss": 1.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")] == [
        (0, 1.0),
        (1, 1.0),
        (2, 1.0),
    ]


def test_a_directory_another_process_runs_in_is_refused(tmp_path: Path) -> None:
    """Two runs into one directory at once would interleave their metrics and remove each other's files."""
    out = tmp_path / "run"
    out.mkdir()
    with (out / ".lock").open(
        "a+"
    ) as other:  # another process's hold: a lock on another open file description
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 999")
        other.flush()
        with pytest.raises(RlhfError, match=r"run is in use by another run \(pid 999\): wait for it to end"):
            Run(out, SFTConfig(out_dir=str(out)))
    assert not (out / "checkpoints").exists()
    Run(out, SFTConfig(out_dir=str(out)))  # its hold released: this process runs there, and may again
    Run(out, SFTConfig(out_dir=str(out)), resume=True)


def test_a_batch_larger_than_the_data_names_the_setting_and_the_file() -> None:
    from rlhf.errors import ConfigError
    from rlhf.train.common import BatchPlan

    with pytest.raises(
        ConfigError, match=r"^sft.batch_size \(8\) is larger than the training set \(6 examples in d.jsonl\)$"
    ):
        BatchPlan(6, 8, 8, 1, 0, name="sft.batch_size", source="d.jsonl")


def test_max_steps_goes_on_past_the_epochs_in_a_new_order() -> None:
    from rlhf.train.common import BatchPlan

    plan = BatchPlan(6, 4, 2, epochs=1, seed=0, max_steps=3)  # one step per epoch (4 of the 6 examples)
    assert plan.total_steps == 3 and BatchPlan(6, 4, 2, 1, 0).total_steps == 1
    batches = [plan.global_batch(step) for step in range(plan.total_steps)]
    assert all(len(b) == 4 and len(set(b)) == 4 for b in batches)
    assert len({tuple(b) for b in batches}) == 3  # each epoch shuffled anew
    assert BatchPlan(40, 4, 2, epochs=2, seed=0, max_steps=3).total_steps == 3  # and stops early


def test_rows_made_with_other_settings_are_not_resumed(tmp_path: Path) -> None:
    """A stage that keeps its rows across runs (red team, CAI) refuses a folder whose rows another model made."""
    import yaml

    from rlhf.errors import RlhfError
    from rlhf.runs import check_same_settings

    rows = tmp_path / "attacks.jsonl"
    before = {"target": "runs/sft/final", "rounds": 2, "temperature": 1.0}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(before))
    check_same_settings(tmp_path, {**before, "target": "runs/ppo/best"}, rows)  # no rows yet: nothing to mix
    rows.write_text("{}\n")
    check_same_settings(
        tmp_path, {**before, "rounds": 4}, rows, frozenset({"rounds"})
    )  # more rounds: a resume
    with pytest.raises(
        RlhfError,
        match=r"holds attacks.jsonl made with other settings \(target 'runs/sft/final' -> 'runs/ppo/best'\)",
    ):
        check_same_settings(tmp_path, {**before, "target": "runs/ppo/best"}, rows, frozenset({"rounds"}))


def test_a_run_that_stops_before_its_first_output_puts_the_earlier_run_back(tmp_path: Path) -> None:
    """A bad setting found after the run directory is set up (a batch larger than the data, a reward model
    given as the policy) must not cost the earlier run its checkpoints, metrics and config."""
    from rlhf.runs import abandon_unstarted_runs

    out = tmp_path / "run"
    earlier_run(out, SFTConfig(out_dir=str(out), lr=1e-3))
    (out / "summary.json").write_text('{"steps": 200}')
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    Run(out, SFTConfig(out_dir=str(out), lr=3e-3), records=("cache.pt",))
    assert not (out / "metrics.jsonl").exists() and "lr: 0.003" in (out / "config.yaml").read_text()
    abandon_unstarted_runs()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # checkpoints, metrics, summary, cache and config.yaml as they were

    new = tmp_path / "new"
    Run(new, SFTConfig(out_dir=str(new)))
    abandon_unstarted_runs()
    assert not new.exists()  # a directory this run made is removed whole


def test_a_run_that_wrote_output_is_not_undone(tmp_path: Path) -> None:
    from rlhf.runs import STASH, abandon_unstarted_runs

    out = tmp_path / "run"
    earlier_run(out, SFTConfig(out_dir=str(out), lr=1e-3))
    run = Run(out, SFTConfig(out_dir=str(out), lr=3e-3))
    run.log(1, {"loss": 2.0})
    assert not (out / STASH).exists()  # the earlier run is gone once the new one has written
    abandon_unstarted_runs()
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    assert run.latest_checkpoint() is None and "lr: 0.003" in (out / "config.yaml").read_text()


def test_the_command_undoes_a_stage_that_failed_before_its_first_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import rlhf.cli
    from rlhf.errors import ConfigError

    out = tmp_path / "run"
    earlier_run(out, SFTConfig(out_dir=str(out), lr=1e-3))

    def stage() -> None:
        Run(out, SFTConfig(out_dir=str(out), batch_size=64))
        raise ConfigError("sft.batch_size (64) is larger than the training set (51 examples in d.jsonl)")

    monkeypatch.setattr(rlhf.cli, "app", stage)
    with pytest.raises(SystemExit) as exit_:
        rlhf.cli.main()
    assert exit_.value.code == 1 and capsys.readouterr().err.startswith("error: sft.batch_size (64)")
    assert (out / "checkpoints" / "step-0000200" / "model.txt").read_text() == "weights"
    assert (out / "metrics.jsonl").exists() and "batch_size: 64" not in (out / "config.yaml").read_text()


def test_an_interrupted_run_stays_for_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C before the first output: the new run stays (with what it wrote, e.g. DPO's reference cache), and
    the earlier run it replaces is removed, as the run would have done on its first output."""
    import rlhf.cli
    from rlhf.runs import STASH

    out = tmp_path / "run"
    earlier_run(out, SFTConfig(out_dir=str(out), lr=1e-3))

    def stage() -> None:
        Run(out, SFTConfig(out_dir=str(out), lr=3e-3), records=("cache.pt",))
        (out / "cache.pt").write_text("the new run's")
        raise SystemExit(130)

    monkeypatch.setattr(rlhf.cli, "app", stage)
    with pytest.raises(SystemExit):
        rlhf.cli.main()
    assert not (out / STASH).exists() and not (out / "metrics.jsonl").exists()
    assert not any((out / "checkpoints").iterdir()) and "lr: 0.003" in (out / "config.yaml").read_text()
    assert (out / "cache.pt").read_text() == "the new run's"


def test_resuming_in_a_folder_that_does_not_exist_says_a_new_run_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "typo"
    with caplog.at_level(logging.INFO, logger="rlhf.runs"):
        run = Run(out, SFTConfig(out_dir=str(out)), resume=True)
    assert f"{out}: no run to resume there, so a new one starts" in caplog.text
    assert run.latest_checkpoint() is None


def test_a_resume_into_another_stages_run_names_that_stage(tmp_path: Path) -> None:
    """A reward run's folder resumed as DPO: its data settings may match, and it used to go on to a missing
    checkpoint folder; the stored settings say whose run it is."""
    out = tmp_path / "run"
    earlier_run(out, SFTConfig(out_dir=str(out), max_steps=200))
    with pytest.raises(
        RlhfError, match=f"^{re.escape(str(out))} holds a run of the sft stage, not of this stage"
    ):
        Run(out, DPOConfig(out_dir=str(out)), resume=True)
    with pytest.raises(RlhfError, match="holds a run of the sft stage"):
        Run(out, DPOConfig(out_dir=str(out)), is_main=False, resume=True)


def test_a_tracker_that_fails_to_start_is_one_line(tmp_path: Path) -> None:
    """MLflow's refusal of a file store, W&B's of an unknown mode: an 85-line traceback before training."""

    class Refusing:
        log_with = ["mlflow"]

        def init_trackers(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError(
                "The filesystem tracking backend is not allowed\nset MLFLOW_ALLOW_FILE_STORE=true"
            )

    with pytest.raises(
        RlhfError, match=r"^log_with \['mlflow'\]: the tracker did not start \(The filesystem .*allowed\)$"
    ):
        Run(tmp_path / "run", SFTConfig(out_dir=str(tmp_path / "run")), accelerator=Refusing())  # type: ignore[arg-type]


def test_a_run_resumed_with_another_lr_trains_at_it_from_its_step_on() -> None:
    """The checkpoint's schedule held the lr the run started with: resumed with --set STAGE.lr=..., the run logged
    the change and wrote the new lr to its config.yaml, but kept training at the old one."""
    import torch

    from rlhf.runs import restore_schedule

    def made(lr: float) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * (1 - s / 20))

    opt, sched = made(1e-3)
    for _ in range(6):
        opt.step()
        sched.step()
    saved = (opt.state_dict(), sched.state_dict())
    factor = min(1.0, 7 / 4) * (1 - 6 / 20)
    for lr in (1e-3, 2e-3):
        again, again_sched = made(lr)
        restore_schedule(again, again_sched, again.load_state_dict, *saved)
        assert again.param_groups[0]["lr"] == pytest.approx(lr * factor)
        assert again_sched.get_last_lr() == pytest.approx([lr * factor]) and again_sched.last_epoch == 6
        again.step()
        again_sched.step()  # and the schedule goes on from there, at this lr
        assert again.param_groups[0]["lr"] == pytest.approx(lr * (1 - 7 / 20))


def test_a_damaged_checkpoint_is_passed_over_and_a_damaged_file_is_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint whose trainer state or weights were cut short stopped --resume with a traceback
    (PytorchStreamReader, SafetensorError) instead of resuming from the checkpoint before it."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "run"
    cfg = SFTConfig(out_dir=str(out))
    run = Run(out, cfg)
    for step in (1, 2, 3):
        run.save_checkpoint(step, lambda d: save_file({"w": torch.ones(64)}, str(d / "model.safetensors")),
                            {"optimizer": {"x": torch.ones(256)}})  # fmt: skip
    ckpt = out / "checkpoints"
    assert run.latest_checkpoint() == ckpt / "step-0000003"
    state = (ckpt / "step-0000003" / "trainer_state.pt").read_bytes()
    (ckpt / "step-0000003" / "trainer_state.pt").write_bytes(state[:100])
    with caplog.at_level(logging.WARNING, logger="rlhf.runs"):
        assert run.latest_checkpoint() == ckpt / "step-0000002"
    assert "step-0000003 cannot be read" in caplog.text
    # bits damaged inside the optimiser's tensors, the archive whole: its checksum tells (resumed, the run went NaN)
    ones = b"\x00\x00\x80\x3f" * 16  # torch.ones(256) in the optimiser state, as stored
    assert ones in state
    (ckpt / "step-0000003" / "trainer_state.pt").write_bytes(state.replace(ones, b"\xff" * len(ones), 1))
    assert run.latest_checkpoint() == ckpt / "step-0000002"
    assert "does not match its checksum" in caplog.text
    weights = ckpt / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # its data shorter than its header says
    with pytest.raises(RlhfError, match="no checkpoint can be read"):
        run.latest_checkpoint()
    # damaged inside its data, past what opening reads (a whole archive, its pickle garbled): loading it is one
    # line naming it
    import zipfile

    path = ckpt / "step-0000003" / "trainer_state.pt"
    path.write_bytes(state)
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, b"\x80\x02garbage" if name.endswith("data.pkl") else data)
    with pytest.raises(RlhfError, match=r"trainer_state.pt: cannot be read .*remove .*step-0000003"):
        Run.load_state(ckpt / "step-0000003")


def test_a_metrics_line_cut_short_is_left_out_on_resume(tmp_path: Path) -> None:
    """A run killed while appending a metrics row left a torn last line: --resume stopped on a JSONDecodeError."""
    out = tmp_path / "run"
    run = Run(out, SFTConfig(out_dir=str(out)))
    for step in (1, 2, 3):
        run.log(step, {"loss": 1.0})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 4, "sft/lo')
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [1, 2, 3]
    run.truncate_metrics(2)
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [1, 2]
    run.metrics_path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RlhfError, match=r"metrics.jsonl:2: not a metrics row"):
        read_metrics(run.metrics_path)


def test_a_run_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """`--out notes.txt` (or a folder under it) ended in a FileExistsError traceback; the file stays as it was."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out in (notes, notes / "run"):
        with pytest.raises(RlhfError, match=rf"^--out: {re.escape(str(notes))} is a file, so the directory "):
            Run(out, SFTConfig(out_dir=str(out)))
    assert notes.read_text() == "mine"


def test_a_run_refuses_to_start_from_a_model_inside_its_own_directory(tmp_path: Path) -> None:
    """`rlhf sft --set sft.model=runs/x/final --out runs/x` replaced the pretrained model it started from, and its
    config.yaml named the SFT model as its own start."""
    out = tmp_path / "x"
    (out / "final").mkdir(parents=True)
    with pytest.raises(RlhfError, match=r"^model .*x/final lies inside this run's directory"):
        Run(out, SFTConfig(out_dir=str(out), model=str(out / "final")))
    assert not (out / "config.yaml").exists()
    elsewhere = tmp_path / "pretrain" / "final"
    elsewhere.mkdir(parents=True)
    Run(out, SFTConfig(out_dir=str(out), model=str(elsewhere)))  # beside it is fine
    with pytest.raises(RlhfError, match=r"^reward_model "):
        Run(out, PPOConfig(out_dir=str(out), policy=str(elsewhere), reward_model=str(out / "final")))
