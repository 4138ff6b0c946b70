"""Run directories: the resolved config, metrics.jsonl, and atomic checkpoints that `--resume` continues from.

RUN/config.yaml              the resolved config of the stage
RUN/metrics.jsonl            one JSON object per logged step
RUN/checkpoints/step-000200  model (safetensors) + tokenizer + trainer_state.pt, written to a temp dir
                             and renamed into place, so a killed run never leaves half a checkpoint
RUN/final                    the finished model, loadable by any Hugging Face tool

A run started without `--resume` in a directory holding an earlier run starts over: the earlier run's
checkpoints, metrics and other records (`EARLIER_RUN`, and what the stage names) are removed first, with a
warning, so that nothing of it is mixed into the new run (metrics appended, its checkpoints taken by a later
`--resume`, the new run's first checkpoint pruned as the oldest). Its `final/` stays until the new one
replaces it. Resuming with another setting of what the run trains on (its data, models or method:
FIXED_ON_RESUME) is an error; other settings changed since the run started are logged.

Until the run writes its first metrics or checkpoint, nothing of the earlier run is lost: its records wait in
`RUN/.earlier-run/`, and a stage that stops with an error before then (a bad setting, a model of the wrong kind, a
batch larger than the data) puts them back and removes what it wrote (`abandon_unstarted_runs`, which the `rlhf`
command calls on an error), so bad input leaves no partial run directory behind. Interrupted (Ctrl-C), a run
stays for `--resume` and the earlier one is removed, as once it has written (`keep_unstarted_runs`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from pydantic import BaseModel

from rlhf.config import dump_config
from rlhf.config.loading import stages_with
from rlhf.data.jsonl import atomic_write_text, check_output_dir, give_open_modes
from rlhf.errors import RlhfError
from rlhf.models.loading import replace_dir

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
# what a stage's run leaves in its directory besides final/ (PPO: the guard's best checkpoint)
EARLIER_RUN = ("checkpoints", "metrics.jsonl", "summary.json", "best", "trackers")
STASH = ".earlier-run"  # an earlier run's records until the new run writes its first metrics or checkpoint
_unstarted: list[Run] = []  # runs of this process that have not written metrics or a checkpoint yet
LOCK = ".lock"
_locks: dict[Path, Any] = {}  # run directories this process holds, and the open lock file of each


def lock_run_dir(path: Path) -> None:
    """Hold `path` for this process until it exits: a second run into the same directory at the same time (from
    another process) would interleave its metrics and checkpoints with this one's and remove its files. A one-line
    error for that second run; this process may open the same directory again (stages run one after another)."""
    key = path.resolve()
    if key in _locks:
        return
    check_output_dir(path, "--out")
    path.mkdir(parents=True, exist_ok=True)
    handle = (path / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RlhfError(
            f"{path} is in use by another run ({holder}): wait for it to end, or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _locks[key] = handle


class Run:
    """One stage's run directory. Only the main process writes."""

    def __init__(
        self,
        out_dir: str | Path,
        config: BaseModel,
        is_main: bool = True,
        accelerator: Accelerator | None = None,
        resume: bool = False,
        records: tuple[str, ...] = (),
    ) -> None:
        """`resume`: the run continues the one in `out_dir` (else an earlier run there is cleared away, see the
        module's docstring); `records`: files or folders of the stage's own to clear with it (caches)."""
        self.dir = Path(out_dir)
        self._passed_over: set[tuple[Path, str]] = set()  # damaged checkpoints already warned of
        _refuse_inputs_inside(self.dir, config)
        self.checkpoints = self.dir / "checkpoints"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.is_main = is_main
        self._existed = self.dir.exists()
        if is_main:  # first: another process's run there keeps all it has
            lock_run_dir(self.dir)
            # left by a process killed before its run wrote anything: that run had started over
            shutil.rmtree(self.dir / STASH, ignore_errors=True)
        config_path = self.dir / "config.yaml"
        self._old_config = config_path.read_text() if is_main and config_path.is_file() else None
        self._had_checkpoints = self.checkpoints.exists()
        # resumed before its first checkpoint: the run starts again at step 0, and its earlier rows go when it
        # logs its first (kept until then, should it stop before)
        self._restarts = resume and self.latest_checkpoint() is None and self.metrics_path.exists()
        if resume and self._existed:
            # every process refuses a setting the run must keep, not the main one alone: the others would go
            # on to load a checkpoint that does not fit and end in a traceback
            _log_changed_settings(config_path, config, log_changes=is_main)
        if is_main:
            if resume and not self._existed:  # a mistyped --out would otherwise start over unannounced
                log.info("%s: no run to resume there, so a new one starts", self.dir)
            elif not resume:
                _clear_earlier_run(self.dir, EARLIER_RUN + records)
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            atomic_write_text(config_path, dump_config(config))
            _unstarted.append(self)
        # accelerate's trackers (TensorBoard, W&B, MLflow), where the accelerator was made with `log_with`
        self.accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        if self.accelerator is not None:
            project = config.__class__.__name__.removesuffix("Config").lower()
            # resumed, TensorBoard drops what the run logged after its checkpoint, which the run logs again
            purge: dict[str, Any] = {}
            if resume:
                checkpoint = self.latest_checkpoint()
                first = int(checkpoint.name.removeprefix("step-")) + 1 if checkpoint is not None else 0
                purge = {"tensorboard": {"purge_step": first}}
            try:
                self.accelerator.init_trackers(project, config=flat_config(config.model_dump(mode="json")),
                                               init_kwargs=purge)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - each tracker fails in its own way; the user needs its reason
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RlhfError(
                    f"log_with {self.accelerator.log_with}: the tracker did not start ({reason})"
                ) from None

    def started(self) -> None:
        """The run writes its first output: the earlier run it replaces is gone for good."""
        if self in _unstarted:
            _unstarted.remove(self)
            shutil.rmtree(self.dir / STASH, ignore_errors=True)

    def abandon(self) -> None:
        """The stage stopped before its first output: remove what it wrote, put the earlier run back."""
        if self not in _unstarted:
            return
        _unstarted.remove(self)
        if not self._existed:
            handle = _locks.pop(self.dir.resolve(), None)
            if handle is not None:
                handle.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        if not self._had_checkpoints:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        else:  # resumed: only its temp dirs are this run's (a fresh run's earlier checkpoints are in the stash)
            for tmp in self.checkpoints.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        if self._old_config is not None:
            atomic_write_text(self.dir / "config.yaml", self._old_config)
        else:
            (self.dir / "config.yaml").unlink(missing_ok=True)
        _restore_stash(self.dir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.started()
        if self._restarts:
            self.truncate_metrics(-1)
            self._restarts = False
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None:
            scalars = {k: v for k, v in row.items()
                       if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
            self.accelerator.log(scalars, step=step)

    def finish(self) -> None:
        """Close the trackers (they flush what they hold). Not `accelerator.end_training()`: that also destroys
        the process group, which a later stage run in the same process still needs."""
        self.started()
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: drop rows logged after the checkpoint, so the file reads as one uninterrupted run."""
        if not self.is_main or not self.metrics_path.exists():
            return
        kept = [
            json.dumps(row) for row in read_metrics(self.metrics_path) if row.get("step", 0) <= after_step
        ]
        atomic_write_text(self.metrics_path, "".join(r + "\n" for r in kept))

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that can be read; a newer one that cannot (a file cut short or damaged on
        disk) is passed over with a warning, so the run resumes from the one before it."""
        found = sorted(p for p in self.checkpoints.glob("step-*") if (p / STATE_FILE).exists())
        for checkpoint in reversed(found):
            damage = unreadable(checkpoint)
            if damage is None:
                return checkpoint
            if (checkpoint, damage) not in self._passed_over:  # said once, however often the run asks
                self._passed_over.add((checkpoint, damage))
                log.warning("%s cannot be read (%s): passed over, the run resumes from an earlier checkpoint",
                            checkpoint, damage)  # fmt: skip
        if found:
            raise RlhfError(f"{self.checkpoints}: no checkpoint can be read ({unreadable(found[-1])}): start "
                            "again without --resume")  # fmt: skip
        return None

    def save_checkpoint(
        self, step: int, save_files: Any, state: dict[str, Any], keep: int = 2
    ) -> Path | None:
        """`save_files(dir)` writes model files; `state` (optimiser, scheduler, RNG...) goes to trainer_state.pt."""
        if not self.is_main:
            return None
        self.started()
        target = self.checkpoints / f"step-{step:07d}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=".tmp-"))
        try:
            save_files(tmp)
            torch.save({"step": step, "rng": rng_state(), **state}, tmp / STATE_FILE)
            give_open_modes(tmp)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in sorted(self.checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def resume(self, checkpoint: Path, optimizer: Any, scheduler: Any, load_optimizer: Any = None) -> int:
        """Restore optimiser, scheduler and RNG from `checkpoint`, drop metrics logged after it; returns its step.
        `load_optimizer(state)`, if given, restores the optimiser instead (a sharded one: rlhf.train.sharding)."""
        state = self.load_state(checkpoint)
        restore_schedule(optimizer, scheduler, load_optimizer or optimizer.load_state_dict, state["optimizer"],
                         state["scheduler"])  # fmt: skip
        set_rng_state(state["rng"])
        self.truncate_metrics(state["step"])
        log.info("%s: resumed from %s (step %d)", self.dir, checkpoint, state["step"])
        return int(state["step"])

    @staticmethod
    def load_state(checkpoint: Path) -> dict[str, Any]:
        try:
            return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)  # type: ignore[no-any-return]
        except Exception as e:  # noqa: BLE001  damaged inside its data, a pickle can fail in any way
            raise RlhfError(f"{checkpoint / STATE_FILE}: cannot be read ({str(e).splitlines()[0]}): remove "
                            f"{checkpoint} to resume from the checkpoint before it") from None  # fmt: skip


# the settings naming a model a stage reads (FIXED_ON_RESUME names them among others)
INPUT_MODELS = ("model", "policy", "reference", "reward_model", "critic", "init_from", "tokenizer")


def _refuse_inputs_inside(out_dir: Path, config: BaseModel) -> None:
    """RlhfError where a model the stage reads lies inside the run directory it writes: a new run there clears
    the checkpoints, and its final/ replaces the model it started from, whose config.yaml then names itself as
    its start (`rlhf sft --set sft.model=runs/x/final --out runs/x` over a pretraining run)."""
    out = out_dir.expanduser().resolve()
    for key in INPUT_MODELS:
        value = getattr(config, key, None)
        if not isinstance(value, str) or not value or not Path(value).expanduser().exists():
            continue
        path = Path(value).expanduser().resolve()
        if path == out or out in path.parents:
            raise RlhfError(f"{key} {value} lies inside this run's directory {out_dir}, whose final/ and checkpoints "
                            "the run replaces: copy the model elsewhere, or choose another --out")  # fmt: skip


def restore_schedule(
    optimizer: Any,
    scheduler: Any,
    load_optimizer: Any,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
) -> None:
    """An optimiser and its learning-rate schedule (a LambdaLR) from a checkpoint, at this run's peak learning
    rate: the checkpoint holds the rate the run started with (the schedule's base rates, each group's
    `initial_lr`), so a run resumed with another lr, which resuming allows and logs, kept training at the old one
    while its config.yaml named the new. The schedule's shape (warm-up, decay over the steps) is this run's
    config's either way."""
    configured = [group["initial_lr"] for group in optimizer.param_groups]
    load_optimizer(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if list(scheduler.base_lrs) == configured:
        return
    scheduler.base_lrs = configured
    for group, base, factor in zip(optimizer.param_groups, configured, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def abandon_unstarted_runs() -> None:
    """After an error: every run of this process that wrote no metrics or checkpoint yet is undone (Run.abandon)."""
    for run in list(_unstarted):
        run.abandon()


def keep_unstarted_runs() -> None:
    """After an interruption (Ctrl-C): the runs stay for `--resume`, and the earlier runs they replace go."""
    for run in list(_unstarted):
        run.started()


def _clear_earlier_run(run_dir: Path, names: tuple[str, ...]) -> None:
    """Move an earlier run's records into RUN/.earlier-run/, deleted once the new run writes its first output."""
    found = [run_dir / name for name in names if (run_dir / name).exists()]
    if not found:
        return
    kept = (
        " (its final/ is the earlier run's model until this one writes its own)"
        if (run_dir / "final").exists()
        else ""
    )
    log.warning("%s holds an earlier run and this one does not resume it (--resume): removing its %s once this "
                "one writes its first metrics or checkpoint%s", run_dir, ", ".join(p.name for p in found), kept)  # fmt: skip
    stash = run_dir / STASH
    stash.mkdir()
    for path in found:
        path.rename(stash / path.name)  # its config.yaml goes back from memory (Run.abandon)


def _restore_stash(run_dir: Path) -> None:
    """Put an earlier run's records back from RUN/.earlier-run/, replacing what is in their place."""
    stash = run_dir / STASH
    if not stash.is_dir():
        return
    for path in stash.iterdir():
        target = run_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        path.rename(target)
    stash.rmdir()


# What a resumed run keeps: the data it trains on and how its held-out split is drawn, the models it starts from
# and the method, with the settings that make one method another (GRPO's and Dr. GRPO's loss aggregation, KL in
# the reward or in the loss, advantages scaled by the group's spread or not; DPO and conservative DPO). With
# another, it would be two runs in one (held-out prompts it has trained on, a critic dropped half-way, adapters on
# a run that trained every weight); other settings (more steps, another lr or beta, logging) may change, and are
# logged.
FIXED_ON_RESUME = frozenset({
    "train_file", "eval_file", "eval_fraction", "columns", "format", "seed", "model", "tokenizer", "policy",
    "reference", "reward_model", "critic", "init_from", "prompts_file", "advantage_estimator",
    "samples_per_prompt", "loss", "vocab_size", "loss_aggregation", "kl_in", "kl_estimator", "grpo_scale_by_std",
    "label_smoothing",
})  # fmt: skip
FIXED_SECTIONS_ON_RESUME = ("arch", "lora")


def _fixed_on_resume(key: str) -> bool:
    return key in FIXED_ON_RESUME or key.split(".", 1)[0] in FIXED_SECTIONS_ON_RESUME


def _log_changed_settings(stored: Path, config: BaseModel, log_changes: bool = True) -> None:
    """On resume: a one-line error for a setting the run must keep (FIXED_ON_RESUME); the others that differ
    from those the run started with are logged (more steps are the usual ones) where `log_changes`."""
    before = _stored_settings(stored)
    if before is None:
        return
    now = flat_config(config.model_dump(mode="json"))
    if other := _other_stage(before, config):
        raise RlhfError(f"{stored.parent} holds a run of {other}, not of this stage: --resume continues a run of "
                        "its own stage; choose another --out")  # fmt: skip
    fixed = [k for k, v in now.items() if k in before and before[k] != v and _fixed_on_resume(k)]
    if fixed:
        shown = "; ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in fixed[:4])
        raise RlhfError(
            f"{stored.parent} was started with other settings of what it trains on ({shown}"
            f"{'; ...' if len(fixed) > 4 else ''}): --resume continues a run as it began; resume with its own "
            f"settings ({stored}), or start a new run in another --out"
        )
    changed = changed_settings(before, now)
    if changed and log_changes:
        log.warning(
            "%s: resuming with settings changed since the run started: %s", stored.parent, "; ".join(changed)
        )


def changed_settings(
    before: dict[str, Any], now: dict[str, Any], ignore: frozenset[str] = frozenset()
) -> list[str]:
    """ "key before -> now" for each flat setting (flat_config) that differs, those in `ignore` left out."""
    return [
        f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k, v) != v and k not in ignore
    ]


def check_same_input(out: Path, rows: Path, source: str | Path, kept_name: str) -> None:
    """An input file's content, kept in OUT/`kept_name` (its sha256): a resume with the file edited in place
    would make the rest of the rows from other input than the rows already written (another constitution,
    other seeds). A one-line error then, as `check_same_settings` gives for another setting."""
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    kept = out / kept_name
    if rows.is_file() and kept.is_file() and kept.read_text().strip() != digest:
        raise RlhfError(f"{out} holds {rows.name} made under another version of {source}: choose another "
                        f"--out, or delete {out} to start over")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(kept, digest + "\n")


def check_same_settings(
    out: Path, settings: dict[str, Any], rows: Path, may_change: frozenset[str] = frozenset()
) -> None:
    """For a stage that resumes by keeping the rows it wrote (answers, revisions, labels): `rows` were made with
    the settings in OUT/config.yaml, so a run with others (another model, judge, sampling) in the same folder
    would report them as its own. A one-line error then; the settings in `may_change` (how many prompts or
    rounds, batch sizes, request rates) extend or pace a run without changing its rows."""
    before = _stored_settings(out / "config.yaml") if rows.is_file() else None
    if before is None:
        return
    now = flat_config(settings)
    changed = [
        k for k, v in now.items() if k in before and before[k] != v and k.split(".")[-1] not in may_change
    ]
    if changed:
        shown = "; ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in changed[:4])
        raise RlhfError(
            f"{out} holds {rows.name} made with other settings ({shown}{'; ...' if len(changed) > 4 else ''}): "
            f"choose another --out, or delete {out} to start over"
        )


def _other_stage(before: dict[str, Any], config: BaseModel) -> str:
    """The stage (or stages) whose settings a stored run's are, where they are not `config`'s: settings it does not
    have are another stage's, not an older version of its own (versions add settings)."""
    stored = {key.split(".")[0] for key in before}
    if stored <= set(type(config).model_fields):
        return ""
    stages = stages_with(stored)
    return f"the {' or '.join(stages)} stage" if stages else "another stage"


def _stored_settings(stored: Path) -> dict[str, Any] | None:
    """The flat settings of a run's config.yaml, or None where there is none (or it cannot be read)."""
    try:
        return flat_config(yaml.safe_load(stored.read_text()) or {})
    except (OSError, yaml.YAMLError):
        return None


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as the flat `section.key: scalar` mapping trackers take as hyper-parameters (lists as text)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float | int | str | bool) or v is None:
        return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file; a last line cut short (the process killed while appending it) is left
    out, any other line that is not JSON is an error naming it."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1:
                log.warning("%s: line %d was cut short (%s): left out", path, i, e.msg)
                continue
            raise RlhfError(f"{path}:{i}: not a metrics row ({e.msg})") from None
    return rows


def unreadable(checkpoint: Path) -> str | None:
    """Why a checkpoint's files cannot be read (its trainer state: an archive whose index is gone or a member that
    fails its checksum; a safetensors file whose header or size is wrong), or None. Safetensors files carry no
    checksum: weights damaged inside their data are not found here. Read once per process and state file (a
    resume asks several times, and the checksums read the whole optimiser state)."""
    try:  # the files it reads, as they are now: a file changed since is read again
        files = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size)
                      for f in sorted([checkpoint / STATE_FILE, *checkpoint.rglob("*.safetensors")]))  # fmt: skip
    except OSError as e:
        return f"{e.__class__.__name__}: {e}"
    return _unreadable(checkpoint, files)


@functools.cache
def _unreadable(checkpoint: Path, files: tuple[tuple[str, int, int], ...]) -> str | None:
    import zipfile

    from safetensors import SafetensorError, safe_open

    try:
        with zipfile.ZipFile(checkpoint / STATE_FILE) as state:  # every member against its CRC: bits damaged
            damaged = state.testzip()  # inside the optimiser's tensors would resume as NaN, with no error
        if damaged is not None:
            return f"{STATE_FILE}: {damaged} does not match its checksum"
        for weights in checkpoint.rglob("*.safetensors"):
            with safe_open(str(weights), "pt"):
                pass
    except (OSError, zipfile.BadZipFile, SafetensorError) as e:
        return f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def metrics_at(path: str | Path, step: int) -> dict[str, Any]:
    """Every metric logged at `step` (training and held-out rows merged), {} without a metrics file: what a run
    resumed at its last step reports, having no step left to train."""
    if not step or not Path(path).exists():
        return {}
    merged: dict[str, Any] = {}
    for row in read_metrics(path):
        if row["step"] == step:
            merged |= {k: v for k, v in row.items() if k != "step"}
    return merged
