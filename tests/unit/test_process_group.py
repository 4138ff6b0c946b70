"""The process group a training stage runs in is destroyed before the interpreter shuts down (left to
finalization, gloo's worker threads can abort a process whose work is all done), and not before: stages run one
after another in one process share it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.errors import ConfigError
from rlhf.train.common import make_accelerator

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import atexit, sys
import torch.distributed as dist
from rlhf.train.common import make_accelerator

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
make_accelerator("fp32")
make_accelerator("bf16")  # a second stage in the same process, at another precision
print("after the stages:", dist.is_initialized())
atexit._run_exitfuncs()
print("at exit:", dist.is_initialized())
"""


def test_the_process_group_outlives_the_stages_and_is_destroyed_at_exit(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["after the stages: True", "at exit: False"]


def test_accelerates_fsdp_plugin_on_cpu_processes_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`accelerate launch --use_fsdp` (which sets ACCELERATE_USE_FSDP) fails inside accelerate on CPU processes,
    a traceback from each: refused in one line that names the stage setting that shards them."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if torch.cuda.is_available():
        pytest.skip("accelerate's plugin shards GPU processes")
    with pytest.raises(
        ConfigError, match=r"^accelerate launch --use_fsdp does not shard CPU processes: .*fsdp=true"
    ):
        make_accelerator("fp32")
