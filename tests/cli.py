"""`rlhf ARGS` run through the command's own entry point (`rlhf.cli.main`, its one-line errors and exit codes
included) in the test's process, where torch and transformers are already imported: a subprocess would pay
for those imports again on every call."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from unittest.mock import patch

import pytest

from rlhf.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    with (
        patch.object(sys, "argv", ["rlhf", *args]),
        redirect_stdout(out),
        redirect_stderr(err),
        pytest.raises(SystemExit) as exit_,
    ):
        main()
    return subprocess.CompletedProcess(list(args), exit_.value.code or 0, out.getvalue(), err.getvalue())


def launch_two(*args: str) -> list[str]:
    """The command that runs `python ARGS` on two CPU processes (gloo) through accelerate's launcher, on a port
    free now: test files run side by side, and two launchers on the default port 29500 collide. The launcher looks
    at its processes once a second: when one fails it stops the other, and at its default 0.1 s, on a loaded
    machine, it stopped a process that was a moment from reporting the same error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--monitor_interval", "1", *args]  # fmt: skip
