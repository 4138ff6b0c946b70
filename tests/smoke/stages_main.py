"""Runs training stages one after another in each process that `accelerate launch` starts (one start-up for all).

    python -m accelerate.commands.launch ... -m tests.smoke.stages_main SPEC.json

SPEC.json: a list of [stage, config fields], stage one of sft, reward, dpo, ppo.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rlhf.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig
from rlhf.stages import dpo, ppo, reward, sft

STAGES: dict[str, tuple[Any, Any]] = {
    "sft": (SFTConfig, sft.run),
    "reward": (RewardConfig, reward.run),
    "dpo": (DPOConfig, dpo.run),
    "ppo": (PPOConfig, ppo.run),
}


def main(spec_file: str) -> None:
    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    for stage, fields in spec:
        config_cls, run = STAGES[stage]
        run(config_cls(**fields), quiet=True)


if __name__ == "__main__":
    main(sys.argv[1])
