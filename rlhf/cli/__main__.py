"""`python -m rlhf.cli ...`, as `accelerate launch -m rlhf.cli` and torchrun run it."""

from rlhf.cli import main

main()
