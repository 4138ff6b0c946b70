"""Sharded training with torch's FSDP2 (`fully_shard`): parameters, gradients and optimiser state split across
the processes that `accelerate launch` or `torchrun` starts, on GPUs (NCCL) or CPU processes (gloo).

accelerate's own FSDP plugin covers GPUs only (on CPU processes it silently falls back to DDP), so the stages
shard here, the same way on every device: each transformer block (the model's `_no_split_modules`) is a unit,
and the module whose forward the stage calls is the root. With `fsdp` off, every function here leaves the
module to accelerate (DDP across processes, or nothing on one).

Saving gathers: every process takes part in building the full state dict, the main process writes it as a
whole Hugging Face model (or LoRA adapter), so a checkpoint loads into one process, another process count or
`rlhf serve`. The optimiser state is gathered the same way, by parameter name, and scattered again on resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from rlhf.config import TrainConfig
from rlhf.errors import ConfigError

log = logging.getLogger(__name__)


def sharded(cfg: TrainConfig, accelerator: Accelerator) -> bool:
    """Whether this stage shards its models: `fsdp` on, and more than one process. `fsdp_cpu_offload` then needs
    GPUs (torch's offload moves the shards to a device for each use): on CPU processes it is a ConfigError."""
    is_sharded = cfg.fsdp and accelerator.num_processes > 1
    if cfg.fsdp and not is_sharded:
        log.warning("fsdp is on, but this is one process: nothing to shard, the model trains whole (launch with "
                    "accelerate launch --multi_gpu --num_processes N, or torchrun, to shard it)")  # fmt: skip
    if is_sharded and cfg.fsdp_cpu_offload and accelerator.device.type == "cpu":
        section = type(cfg).__name__.removesuffix("Config").lower()
        raise ConfigError(f"{section}.fsdp_cpu_offload keeps the shards of GPU processes in CPU memory; these "
                          "processes run on the CPU, where the shards are already: set it to false")  # fmt: skip
    return is_sharded


def block_classes(module: torch.nn.Module) -> set[str]:
    """The class names of the transformer blocks inside `module`, from its models' `_no_split_modules`."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shard(module: torch.nn.Module, cfg: TrainConfig, accelerator: Accelerator) -> torch.nn.Module:
    """fully_shard every transformer block in `module`, then `module` itself as the root (in place).

    Call before the optimiser is made: sharding replaces the parameters. Frozen modules (a reference, a reward
    model) shard the same way and only run forwards; every process must call the root's forward equally often.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    sent = same_on_every_process(module, accelerator.device)
    offload = CPUOffloadPolicy() if cfg.fsdp_cpu_offload else OffloadPolicy()
    names = block_classes(module)
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        log.warning(
            "fsdp: no transformer block found in %s; the whole model is one unit", type(module).__name__
        )
    for block in blocks:
        fully_shard(block, mesh=mesh, offload_policy=offload)
    fully_shard(module, mesh=mesh, offload_policy=offload)
    log.info("fsdp: %s sharded across %d processes (%d blocks of %s; %d tensors made equal first)",
             type(module).__name__, accelerator.num_processes, len(blocks), ", ".join(sorted(names)) or "none",
             sent)  # fmt: skip
    return module


@torch.no_grad()
def same_on_every_process(module: torch.nn.Module, device: torch.device) -> int:
    """Make every process's copy of `module` rank 0's; returns how many tensors were sent.

    Each process shards its own copy, so the copies must be equal first: weights loaded from one checkpoint
    are, but new ones (a LoRA adapter, a scalar head) were drawn from each process's own seed. Rather than
    send the whole model (as DDP does, on the device), a checksum per tensor finds the ones that differ."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.numel()]

    def checksum(t: torch.Tensor) -> list[torch.Tensor]:  # the sum, the first and the last value
        flat = t.detach().reshape(-1)
        return [t.detach().sum(dtype=torch.float64), flat[0].double(), flat[-1].double()]

    sums = torch.stack([c for t in tensors for c in checksum(t)] or [torch.zeros((), dtype=torch.float64)])
    low = sums.to(device)
    high = low.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    unequal = ((low != high) | low.isnan()).tolist()  # 3 values per tensor
    differ = [t for k, t in enumerate(tensors) if any(unequal[3 * k : 3 * k + 3])]
    for t in differ:
        sent = t.data.to(device)
        torch.distributed.broadcast(sent, src=0)
        t.data.copy_(sent)
    return len(differ)


def prepare(
    accelerator: Accelerator, module: torch.nn.Module, optimizer: Any, is_sharded: bool
) -> tuple[Any, Any]:
    """accelerate's prepare, except that a sharded module is not wrapped (no DDP around FSDP): under mixed
    precision its forward runs in the autocast accelerate's prepare puts around a module, outputs in fp32, so
    that a sharded run computes what one process or DDP computes in the same precision."""
    if is_sharded:
        if accelerator.mixed_precision in ("bf16", "fp16"):
            from accelerate.utils import convert_outputs_to_fp32

            forward = module.forward

            def autocast_forward(*args: Any, **kwargs: Any) -> Any:
                with accelerator.autocast():
                    return forward(*args, **kwargs)

            module.forward = convert_outputs_to_fp32(autocast_forward)  # type: ignore[method-assign]
        return module, accelerator.prepare(optimizer)
    return accelerator.prepare(module, optimizer)  # type: ignore[no-any-return]


@torch.no_grad()
def full_state_dict(module: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded `module` on the main process (None elsewhere). Every process calls
    this: each sharded tensor is gathered in turn, so one full tensor at a time is held outside the main one."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in module.state_dict(keep_vars=True).items():  # parameters themselves: tied ones are one
        if (
            id(value) in seen
        ):  # a tied weight (the LM head on the embeddings): written once, as save_pretrained does
            continue
        seen.add(id(value))
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if is_main:
            out[name] = full.detach().to("cpu", copy=True)
    return out if is_main else None


def load_whole(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load what `full_state_dict` gathered into a plain copy of the model (rebuilt by the caller); a tied
    weight, written once, is tied again by the model itself."""
    tied: set[str] = set()
    seen: set[int] = set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            tied.add(name)
        seen.add(id(value))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    return model


def whole_model(
    model: torch.nn.Module, is_sharded: bool, is_main: bool, rebuild: Callable[[], torch.nn.Module]
) -> Any:
    """The model with all its weights on the main process (None elsewhere); every process calls it. Sharded:
    a plain copy, `rebuild()`, with the gathered weights loaded into it."""
    if not is_sharded:
        return model if is_main else None
    state = full_state_dict(model, is_main)
    return None if state is None else load_whole(rebuild(), state)


def optimizer_state(module: torch.nn.Module, optimizer: Any, named: bool) -> dict[str, Any]:
    """The optimiser's state dict. `named` (with fsdp on): whole, keyed by parameter name, so that it loads on
    any process count; every process calls it (the shards are gathered)."""
    if not named:
        return optimizer.state_dict()  # type: ignore[no-any-return]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(module, inner, options=options)


def save_checkpoint(
    run: Any,
    step: int,
    module: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    cfg: TrainConfig,
    accelerator: Accelerator,
    is_sharded: bool,
    save_files: Callable[[Path, dict[str, torch.Tensor] | None], None],
) -> None:
    """A training step's checkpoint through `run` (rlhf.runs.Run: atomic, the last `cfg.keep_checkpoints`
    kept). Every process calls it: sharded weights and optimiser state are gathered first. `save_files(dir,
    whole)` writes the model files on the main process; `whole` is the gathered state dict, None unsharded.
    `module` holds the trained parameters (its `.model` is the Hugging Face model)."""
    accelerator.wait_for_everyone()
    model = cast(torch.nn.Module, module.model)
    whole = full_state_dict(model, accelerator.is_main_process) if is_sharded else None
    state = {"optimizer": optimizer_state(module, optimizer, cfg.fsdp), "scheduler": scheduler.state_dict()}
    run.save_checkpoint(step, lambda path: save_files(path, whole), state, keep=cfg.keep_checkpoints)


def load_optimizer_state(
    module: torch.nn.Module, optimizer: Any, state: dict[str, Any], is_sharded: bool
) -> None:
    """Restore what `optimizer_state` gave (either kind) on this process's shards, or on the whole module."""
    named = any(isinstance(key, str) for key in state.get("state", {}))
    if not named and not is_sharded:
        optimizer.load_state_dict(state)
        return
    if not named and state.get("state"):
        raise ConfigError("this checkpoint's optimiser state was saved without fsdp (by position); resume it "
                          "with fsdp off, or start a new run with fsdp on")  # fmt: skip
    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(module, inner, state, options=StateDictOptions(full_state_dict=is_sharded))
