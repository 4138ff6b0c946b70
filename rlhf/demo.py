"""`rlhf demo`: every stage of the pipeline on the built-in demo task, in one run directory, resumable.

Each stage writes into RUN/<stage>/ and is recorded in RUN/stages.json when it finishes (with its wall time);
started again, the demo skips the finished stages and resumes an unfinished training stage from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.config import RootConfig, load_config
from rlhf.data.jsonl import write_json

log = logging.getLogger(__name__)

# --fast: the same pipeline, reduced everywhere, for CI and a first look.
FAST_OVERRIDES = [
    "data.n_pretrain=6000",
    "data.n_sft=800",
    "data.n_rl_prompts=400",
    "data.n_eval_prompts=100",
    "pretrain.arch.hidden_size=64",
    "pretrain.arch.intermediate_size=192",
    "pretrain.arch.num_hidden_layers=2",
    "pretrain.block_size=96",
    "pretrain.batch_size=16",
    "pretrain.micro_batch_size=16",
    "sft.epochs=1",
]


def default_config_path() -> Path | None:
    """configs/demo.yaml of a source checkout, or the copy shipped in the package."""
    for candidate in (Path(__file__).parents[1] / "configs" / "demo.yaml", Path(__file__).parent / "_configs" / "demo.yaml"):
        if candidate.is_file():
            return candidate
    return None


def demo_config(out: Path, fast: bool, config: Path | None, overrides: list[str]) -> RootConfig:
    """The demo's config with every path pointed into the run directory."""
    data = out / "data"
    paths = [
        f"pretrain.out_dir={out / 'pretrain'}",
        f"pretrain.train_file={data / 'pretrain.txt'}",
        f"sft.out_dir={out / 'sft'}",
        f"sft.model={out / 'pretrain' / 'final'}",
        f"sft.train_file={data / 'sft.jsonl'}",
    ]
    return load_config(config or default_config_path(), [*(FAST_OVERRIDES if fast else []), *overrides, *paths])


class Stages:
    """RUN/stages.json: which stages finished, and how long each took."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.done: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        if name in self.done:
            log.info("demo: %s already finished, skipped", name)
            return
        t0 = time.perf_counter()
        result = fn() or {}
        self.done[name] = {"seconds": round(time.perf_counter() - t0, 2), **{k: v for k, v in result.items() if isinstance(v, int | float | str)}}
        write_json(self.path, self.done)


def run(out: Path, fast: bool = False, config: Path | None = None, overrides: list[str] | None = None, quiet: bool = False) -> Stages:
    from rlhf.data import demo_task
    from rlhf.train import pretrain, sft

    cfg = demo_config(out, fast, config, overrides or [])
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    d = cfg.data

    def data() -> dict[str, Any]:
        demo_task.generate(out / "data", seed=d.seed, n_pretrain=d.n_pretrain, n_sft=d.n_sft, n_rl_prompts=d.n_rl_prompts,
                           n_eval_prompts=d.n_eval_prompts, sft_rude_rate=d.sft_rude_rate, sft_wrong_rate=d.sft_wrong_rate,
                           sft_ramble_rate=d.sft_ramble_rate)  # fmt: skip
        return {"pretrain_docs": d.n_pretrain, "sft_demonstrations": d.n_sft}

    stages.run("data", data)
    stages.run("pretrain", lambda: pretrain.run(cfg.pretrain, resume=True, quiet=quiet))
    stages.run("sft", lambda: sft.run(cfg.sft, resume=True, quiet=quiet))
    return stages
