"""`rlhf ARGS` run through the command's own entry point (`rlhf.cli.main`, its one-line errors and exit codes
included) in the test's process, where torch and transformers are already imported: a subprocess would pay
for those imports again on every call."""

from __future__ import annotations

import io
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
