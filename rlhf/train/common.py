"""What every training stage shares: the accelerator, precision, saving the policy, AdamW
with warm-up + cosine, batch plans, progress."""

from __future__ import annotations

import atexit
import copy
import gc
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from peft import PeftModel
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from rlhf.config import Precision, TrainConfig
from rlhf.engine import lean_llama
from rlhf.engine.packing import TokenLayout
from rlhf.errors import ConfigError, RlhfError
from rlhf.models.loading import save_pretrained_atomic
from rlhf.train import sharding

log = logging.getLogger(__name__)


# oneDNN ISAs below native bf16 dot products: ONEDNN_MAX_CPU_ISA set to one of these makes its bf16 matmuls emulated.
ONEDNN_ISAS_WITHOUT_BF16 = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}


def native_bf16(cpu_flags: set[str], capability: str, onednn_max_isa: str | None) -> bool:
    """Whether bf16 matmuls run natively: the CPU has AVX512-BF16 or AMX, torch's kernels are not held below
    AVX-512 (ATEN_CPU_CAPABILITY) and oneDNN's not below AVX512-BF16 (ONEDNN_MAX_CPU_ISA). Elsewhere bf16 is
    emulated, many times slower than fp32."""
    has_flag = bool(cpu_flags & {"avx512_bf16", "amx_bf16"})
    limited = (onednn_max_isa or "").upper() in ONEDNN_ISAS_WITHOUT_BF16
    return has_flag and capability.upper().startswith("AVX512") and not limited


CPUINFO = Path("/proc/cpuinfo")  # the CPU's flags (Linux); elsewhere absent, and bf16 is not assumed


@cache
def cpu_has_bf16() -> bool:
    """True when this machine's CPU multiplies bf16 natively (see `native_bf16`), where autocast pays off."""
    try:
        cpuinfo = CPUINFO.read_text()
    except OSError:
        return False
    flags = {
        f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()
    }
    capability = torch.backends.cpu.get_cpu_capability()
    return native_bf16(flags, capability, os.environ.get("ONEDNN_MAX_CPU_ISA"))


def resolve_precision(precision: Precision) -> str:
    """'bf16' or 'no' (accelerate's names) for this machine; what `auto` chose is logged once."""
    if precision == "fp32":
        return "no"
    if precision == "bf16":
        return "bf16"
    return _auto_precision()


@cache
def _auto_precision() -> str:
    if torch.cuda.is_available():
        chosen, why = (
            ("bf16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else ("no", "CUDA without bf16")
        )
    elif cpu_has_bf16():
        chosen, why = "bf16", "CPU with native bf16 (AVX512-BF16/AMX)"
    else:
        chosen, why = (
            "no",
            f"CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): bf16 is emulated",
        )
    log.info(
        "precision auto: %s (%s); set precision: fp32 or bf16 to choose",
        "bf16" if chosen == "bf16" else "fp32",
        why,
    )
    return chosen


def make_accelerator(
    precision: Precision, log_with: Sequence[str] = (), project_dir: str | None = None
) -> Accelerator:
    """One accelerator per stage: `accelerate launch` turns the same code into DDP / FSDP / DeepSpeed.

    accelerate keeps one state per process and refuses a second precision; stages run one after another in
    one process (`rlhf demo`, the tests) may differ, so that state is reset (the process group kept) first.
    """
    missing = [name for name in log_with if not _tracker_installed(name)]
    if missing:  # accelerate drops a tracker it cannot import, with a warning at most (none beside another)
        raise ConfigError(f"log_with: {', '.join(missing)} is not installed (pip install {' '.join(missing)}, or "
                          "the project's extra: pip install 'rlhf-loop[tracking]')")  # fmt: skip
    if not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # accelerate's FSDP plugin fails on CPU processes with a traceback from every one of them
        raise ConfigError("accelerate launch --use_fsdp does not shard CPU processes: launch without it and set "
                          "STAGE.fsdp=true (docs/scaling.md)")  # fmt: skip
    mixed_precision = resolve_precision(precision)
    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=list(log_with) or None,
        project_config=ProjectConfiguration(project_dir, logging_dir=f"{project_dir}/trackers")
        if project_dir
        else None,
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _close_process_group_at_exit()
    return accelerator


def _tracker_installed(name: str) -> bool:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    checks = {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
    }
    return checks[name]() if name in checks else True


# How long the main thread lets gloo's worker threads take the GIL before the interpreter shuts down.
GLOO_SETTLE_S = 0.2


@cache
def _close_process_group_at_exit() -> None:
    """The process group lives as long as the process (stages run one after another share it), and is
    destroyed before the interpreter shuts down: left to finalization, gloo's worker threads can abort the
    process (SIGABRT, "terminate called without an active exception") after all its work is done."""
    atexit.register(_close_process_group)


def _close_process_group() -> None:
    """destroy_process_group drops torch's references to the group, but FSDP's mesh keeps the gloo backend, so its
    worker threads are not joined. A worker that held the last reference to a tensor whose Python object is gone
    takes the GIL to release it; during finalization that aborts the process. Collecting garbage first, then
    releasing the GIL a moment, lets those releases happen while the interpreter is whole. A two-process
    all-reduce loop that exits at once aborted in 2 runs of 25 on a loaded 2-core machine; destroying the group
    made it rarer, not impossible (a two-process test run aborted so once)."""
    if torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()
        time.sleep(GLOO_SETTLE_S)


# On a CPU, SDPA's flash kernel has a slow backward in bf16 on short sequences: forward plus backward on one
# thread, its math backend (matmul, softmax, matmul) was 1.1-2.8x faster up to 160 tokens and slower from 192
# on. In fp32, and for the forward alone, flash was the faster (docs/performance.md, "Attention on a CPU").
MATH_ATTENTION_MAX_LEN = 160


def trains_in_half(accelerator: Accelerator) -> bool:
    """Whether training forwards run in bf16/fp16 (accelerate's mixed precision): short_attention's `half`."""
    return accelerator.mixed_precision in ("bf16", "fp16")


def short_attention(length: int, device: torch.device, half: bool) -> Any:
    """For a training forward in bf16/fp16 (`half`) of at most MATH_ATTENTION_MAX_LEN tokens on a CPU, SDPA's
    math backend; otherwise the backend torch picks. The backward follows the backend chosen in the forward."""
    if half and device.type == "cpu" and length <= MATH_ATTENTION_MAX_LEN and torch.is_grad_enabled():
        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


def policy_forward(policy: torch.nn.Module, lay: TokenLayout) -> Tensor:
    """Logits that predict each real response token, (N, V): read at the token before it. `policy`: an Actor."""
    return cast(Tensor, policy(**lay.inputs, response_at=lay.response_at))


def save_policy(path: Path, policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """A plain Hugging Face checkpoint; a LoRA policy is merged into a copy first (the live one keeps training)."""
    model = copy.deepcopy(policy).merge_and_unload() if isinstance(policy, PeftModel) else policy
    save_pretrained_atomic(path, model, tokenizer)  # type: ignore[arg-type]


def lean_forward(model: Any, accelerator: Accelerator, cfg: TrainConfig) -> bool:
    """Whether `model` trains through rlhf.engine.lean_llama: a plain Llama whose weights are whole on this
    process (one process or DDP; FSDP and DeepSpeed shard them, and the lean forward reads them directly).
    With `gradient_checkpointing`, turns it on (Hugging Face's, non-reentrant) and the lean forward off."""
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.2x on
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return False
    whole = not cfg.fsdp and accelerator.distributed_type not in (
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
    )
    # the model is still on the CPU here: where it will train decides (on a GPU, its own attention kernels)
    return whole and accelerator.device.type == "cpu" and lean_llama.supports(model)


def finite_grad_norm(grad_norm: Any, what: str) -> float:
    """The gradient norm `clip_grad_norm_` gave, as a float, before the optimiser steps; RlhfError where it is
    not finite (every process computes the same norm, so all stop together). A NaN or infinite gradient, taken,
    would make every weight NaN, and the run would go on to save that model as its final/ one."""
    value = float(grad_norm)
    if not math.isfinite(value):
        raise RlhfError(
            f"{what}: the gradient norm is {value}: training diverged (a learning rate too high, or data the "
            "model cannot take), so it stopped before the optimiser step and no weight took it; --resume continues "
            "from the last checkpoint, with a lower lr"
        )
    return value


def autocast(accelerator: Accelerator) -> Any:
    """bf16 autocast for forward passes outside prepared modules (reference, reward model, generation)."""
    return accelerator.autocast() if accelerator.mixed_precision == "bf16" else nullcontext()


def no_sync(accelerator: Any, *models: torch.nn.Module, sync: bool) -> ExitStack:
    """Skip DDP's gradient all-reduce for these models unless `sync`: gradient accumulation over micro-batches
    all-reduces once, in the backward of the last."""
    stack = ExitStack()
    if not sync:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms).

    The fused kernel (one pass over each parameter) where torch has one for the parameters' device and dtype:
    on a CPU it took a step of the tiny PPO workload's policy from 2.99 to 0.61 ms.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused and bool(params))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )


class Training(NamedTuple):
    """What `set_up_training` returns, in this order: the module as the loop calls it (wrapped by DDP where there is one),
    the module itself, the optimiser, the schedule, the step to start from, and whether FSDP shards it."""

    module: Any
    unwrapped: Any
    optimizer: Any
    scheduler: Any
    start: int
    is_sharded: bool


def set_up_training(
    module: torch.nn.Module, cfg: TrainConfig, accelerator: Accelerator, run: Any, checkpoint: Path | None,
    total_steps: int,
) -> Training:  # fmt: skip
    """A training loop's module sharded (before the optimiser: sharding replaces its parameters), its AdamW and
    schedule, restored from `checkpoint` (`run`: rlhf.runs.Run) if one is given, and prepared by accelerate."""
    is_sharded = sharding.sharded(cfg, accelerator)
    if is_sharded:
        sharding.shard(module, cfg, accelerator)
    optimizer = make_optimizer(module, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    start = 0
    if checkpoint is not None:
        load = lambda state: sharding.load_optimizer_state(module, optimizer, state, is_sharded)  # noqa: E731
        start = run.resume(checkpoint, optimizer, scheduler, load)
    prepared, optimizer = sharding.prepare(accelerator, module, optimizer, is_sharded)
    return Training(prepared, accelerator.unwrap_model(prepared), optimizer, scheduler, start, is_sharded)


@dataclass
class BatchPlan:
    """Which examples each optimiser step uses, fixed by the seed, so a resumed run sees the same batches:
    `epochs` passes over the data, or `max_steps` steps where set (each epoch in its own order).

    Every process knows the whole global batch (to normalise losses by its token count) and takes its own
    contiguous share, cut into micro-batches.
    """

    n_examples: int
    batch_size: int
    micro_batch_size: int
    epochs: int
    seed: int
    world_size: int = 1
    rank: int = 0
    max_steps: int = 0
    name: str = "batch_size"  # the setting, as errors name it ("sft.batch_size")
    source: str = ""  # where the examples come from (a file), as errors name it

    def __post_init__(self) -> None:
        if self.batch_size % (self.micro_batch_size * self.world_size):
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by micro_batch_size x processes "
                f"({self.micro_batch_size} x {self.world_size})"
            )
        self.steps_per_epoch = self.n_examples // self.batch_size
        if self.steps_per_epoch == 0:
            where = f" in {self.source}" if self.source else ""
            raise ConfigError(
                f"{self.name} ({self.batch_size}) is larger than the training set ({self.n_examples} examples{where})"
            )
        # max_steps, where set, is the number of optimiser steps, over as many epochs as that takes: capping it
        # at `epochs` made a small data set take fewer steps than asked, without a word
        self.total_steps = self.max_steps or self.steps_per_epoch * self.epochs
        self.grad_accum = self.batch_size // (self.micro_batch_size * self.world_size)

    def global_batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(self.n_examples, generator=g)
        return order[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def micro_batches(self, step: int) -> Iterator[list[int]]:
        batch = self.global_batch(step)
        share = self.batch_size // self.world_size
        mine = batch[self.rank * share : (self.rank + 1) * share]
        for i in range(0, share, self.micro_batch_size):
            yield mine[i : i + self.micro_batch_size]


class Progress:
    """A tqdm bar with loss and tokens/s, or plain log lines with --quiet; only on the main process."""

    def __init__(self, total: int, desc: str, enabled: bool, quiet: bool, initial: int = 0) -> None:
        self.quiet, self.enabled, self.desc = quiet, enabled, desc
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            if enabled and not quiet
            else None
        )
        self.tokens, self.t0 = 0, time.perf_counter()

    def update(self, step: int, tokens: int, **metrics: float) -> float:
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()} | {"tok/s": f"{rate:.0f}"})
        return rate

    def line(self, step: int, **metrics: float) -> None:
        if metrics and self.enabled and (self.quiet or self.bar is None):
            log.info("%s step %d %s", self.desc, step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
