"""The process group a training stage runs in is destroyed before the interpreter shuts down (left to
finalization, gloo's worker threads can abort a process whose work is all done), and not before: stages run one
after another in one process share it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
