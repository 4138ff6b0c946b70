"""benchmarks.architectures.merged: runs measured apart (a GPU run stopped at its time limit among them) become one
result in which each block's MFU is against the matmul peak of the run that measured it, and merging that result
again changes nothing."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from benchmarks import architectures

GPU = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 16, "device": "cuda", "gpu": "NVIDIA H200"}
CAPS = {"native_bf16": True, "flags": ["avx2", "amx_bf16"]}


def peak(flops: float) -> dict[str, Any]:
    return {
        "bf16": {"flops": flops, "flops_cpu": flops},
        "fp32": {"flops": flops / 4, "flops_cpu": flops / 4},
    }


def ppo_block(arch: str, flops: float, seconds: float) -> dict[str, Any]:
    ours = [{"flops": {"generation": flops / 2, "training": flops / 2}}]
    return {"arch": arch, "size": "30M", "ppo": {"ours": ours, "ours_iteration_s": seconds,
            "ours_iteration_cpu_s": seconds, "ours_flop_rate": {"training": flops / seconds}}}  # fmt: skip


def run(command: str, blocks: dict[str, Any], matmul_peak: dict[str, Any]) -> dict[str, Any]:
    return {"command": command, "machine": dict(GPU), "capabilities": CAPS, "reps": 3, "iterations": 3,
            "results": blocks, "matmul_peak": matmul_peak}  # fmt: skip


def test_each_block_keeps_its_own_runs_peak_and_a_second_merge_changes_nothing() -> None:
    stopped = run("a", {"llama/30M": ppo_block("llama", 1e12, 1.0)}, {"before": peak(100e12)})
    whole = run("b", {"gpt_neox/30M": ppo_block("gpt_neox", 1e12, 1.0)},
                {"before": peak(40e12), "after": peak(60e12), "dtype": "bf16", "interrupted": False})  # fmt: skip
    out = architectures.merged([stopped, whole], threads=1)
    # the stopped run against the peak it measured at its start; the whole one against the mean of its two
    assert out["results"]["llama/30M"]["ppo"]["ours_mfu"] == pytest.approx(0.01)
    assert out["results"]["gpt_neox/30M"]["ppo"]["ours_mfu"] == pytest.approx(0.02)
    assert out["command"] == "a; and beside it b"
    before = copy.deepcopy(out)
    again = architectures.merged([out], threads=1)
    assert again["results"] == before["results"]
    assert again["command"] == "a; and beside it b"


def test_a_stopped_gpu_run_that_saved_no_peak_is_refused() -> None:
    stopped = run("a", {"llama/30M": ppo_block("llama", 1e12, 1.0)}, {})
    with pytest.raises(SystemExit, match="saved no matmul peak"):
        architectures.merged([stopped], threads=1)
