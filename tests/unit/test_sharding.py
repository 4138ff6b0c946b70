"""rlhf.train.sharding: which settings shard a stage's models."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rlhf.config import SFTConfig
from rlhf.errors import ConfigError
from rlhf.train import sharding


def processes(n: int, device: str = "cpu") -> Any:
    return SimpleNamespace(num_processes=n, device=torch.device(device))


def test_fsdp_shards_on_more_than_one_process() -> None:
    assert sharding.sharded(SFTConfig(fsdp=True), processes(2))
    assert not sharding.sharded(SFTConfig(fsdp=True), processes(1))
    assert not sharding.sharded(SFTConfig(fsdp=False), processes(2))


def test_cpu_offload_on_cpu_processes_is_a_config_error() -> None:
    cfg = SFTConfig(fsdp=True, fsdp_cpu_offload=True)
    with pytest.raises(ConfigError, match="sft.fsdp_cpu_offload .* set it to false"):
        sharding.sharded(cfg, processes(2))
    assert not sharding.sharded(
        cfg, processes(1)
    )  # one process shards nothing: the laptop run of a GPU config
    assert sharding.sharded(cfg, processes(2, "cuda"))
