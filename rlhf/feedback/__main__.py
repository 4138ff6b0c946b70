"""`python -m rlhf.feedback ...`: the `rlhf label` commands on their own (the benchmark starts the server so)."""

import sys

from rlhf.errors import RlhfError
from rlhf.feedback.cli import app

try:
    app(prog_name="rlhf label")
except RlhfError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)
