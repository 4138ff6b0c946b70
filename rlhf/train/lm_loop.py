"""The language-model training loop shared by pretraining and SFT: next-token loss on the labelled tokens.

The loss of a step is the sum of token losses over the whole global batch divided by its number of labelled
tokens, whatever the number of processes or micro-batches, so 1 process and N processes follow the same curve.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import TrainConfig
from rlhf.data.jsonl import write_json
from rlhf.engine.packing import (
    packed_rows,
    sliding_window,
    takes_4d_mask,
    takes_position_ids,
    tree_attention_mask,
    within_window,
)
from rlhf.losses import sft_loss
from rlhf.models.loading import save_model_files, save_pretrained_atomic
from rlhf.models.wrappers import ModelForward
from rlhf.runs import Run
from rlhf.train import sharding
from rlhf.train.common import (
    BatchPlan,
    Progress,
    finite_grad_norm,
    lean_forward,
    no_sync,
    save_policy,
    set_up_training,
    short_attention,
    trains_in_half,
)

log = logging.getLogger(__name__)
IGNORE = -100
Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]} with IGNORE where there is no loss
# a laid-out micro-batch: input_ids, labels, attention_mask (2-D, or 4-D for packed rows), position_ids, real
Batch = dict[str, Tensor]


def n_loss_tokens(example: Example) -> int:
    return sum(1 for t in example["labels"][1:] if t != IGNORE)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad a micro-batch; padding gets attention 0 and label IGNORE. `real` marks the tokens."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    position_ids = torch.arange(width).expand(len(examples), width)
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "position_ids": position_ids,
        "real": mask,
    }


def collate_packed(examples: list[Example], pad_id: int, additive: bool, hidden_size: int | None) -> Batch:
    """A micro-batch's sequences end to end in rows (rlhf.engine.packing's rows and widths), each seeing only
    itself: positions restart at 0 and attention is block-diagonal, so every token gets the loss it gets in a
    padded row. A sequence's first label is never predicted (nothing comes before it in its sequence), so it
    becomes IGNORE: the last token of the sequence before it in the row must not learn to predict it. Where the
    packed rows would compute no fewer positions than padded ones (a few sequences, or all of one length; rows
    come in multiples of ROW_MULTIPLE), the padded rows (`collate`)."""
    lengths = [len(e["input_ids"]) for e in examples]
    width, rows = packed_rows(lengths, hidden_size)
    if len(rows) * width >= len(examples) * max(lengths):
        return collate(examples, pad_id)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    sequence = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            n = lengths[i]
            ids[r, col : col + n] = torch.tensor(examples[i]["input_ids"])
            labels[r, col + 1 : col + n] = torch.tensor(examples[i]["labels"][1:])
            positions[r, col : col + n] = torch.arange(n)
            sequence[r, col : col + n] = i
            col += n
    mask = tree_attention_mask(sequence, additive=additive)  # (R, 1, W, W)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions,
            "real": (sequence >= 0).long()}  # fmt: skip


def packs(model: Any, examples: list[Example]) -> tuple[bool, bool]:
    """(sequences may be packed into rows, with an additive mask): where the model's attention takes a custom 4-D
    mask, no sequence reaches past a sliding window, and the forward takes position ids that restart each
    sequence (rlhf.engine.packing)."""
    works, additive = takes_4d_mask(model)
    longest = max((len(e["input_ids"]) for e in examples), default=0)
    return works and within_window(sliding_window(model), longest) and takes_position_ids(model), additive


class NextTokenLoss(ModelForward):
    """The summed next-token loss of a micro-batch over its labelled tokens (`sft_loss`, reduction "sum").
    The LM head runs only at the labelled tokens (`logits_at`): prompts and padding never reach its matmul."""

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        targets = labels[:, 1:]  # (R, W-1) the token that each position predicts
        counted = targets != IGNORE
        at = (
            F.pad(counted, (0, 1), value=False).flatten().nonzero().squeeze(1)
        )  # (N,) into the (R, W) positions
        logits = self.logits_at(input_ids, attention_mask, position_ids, at)  # (N, V)
        return F.cross_entropy(logits.float(), targets[counted], reduction="sum")


def demonstration_loss(policy: Any, actor: Any, demos: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """SFT's mean loss on a collated batch of demonstrations through `policy` (the Actor, wrapped for DDP/FSDP;
    `actor` the same unwrapped), its routers' term included, and that term (None without routers): the
    objective PPO-ptx keeps (InstructGPT)."""
    rows, width = demos["input_ids"].shape  # right-padded: positions 0, 1, ...
    device = demos["input_ids"].device
    logits = policy(
        input_ids=demos["input_ids"], attention_mask=demos["attention_mask"],
        position_ids=torch.arange(width, device=device).expand(rows, width),
        response_at=torch.arange(rows * width, device=device),
    ).view(rows, width, -1)  # fmt: skip
    loss, aux = sft_loss(logits.float(), demos["labels"]), None
    if actor.aux_coef is not None:
        aux = actor.aux_loss(demos["attention_mask"])
        loss = loss + actor.aux_coef * aux
    return loss, aux


@torch.no_grad()
def evaluate(
    loss_fn: NextTokenLoss,
    examples: list[Example],
    batch_of: Callable[[list[Example]], Batch],
    micro_batch_size: int,
) -> dict[str, float]:
    """Mean next-token loss per labelled token, and its perplexity. `batch_of` lays out a micro-batch."""
    if not examples:
        return {}
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    device = next(loss_fn.parameters()).device
    for i in range(0, len(examples), micro_batch_size):
        batch = {name: t.to(device) for name, t in batch_of(examples[i : i + micro_batch_size]).items()}
        total += float(
            loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
        )
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    loss_fn.train(was_training)
    loss = total / max(1, count)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def fit(
    *,
    stage: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    held_out: list[Example],
    cfg: TrainConfig,
    accelerator: Accelerator,
    run: Run,
    checkpoint: Path | None,
    quiet: bool = False,
    pack: bool = False,
    rebuild: Callable[[], torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """Train `model` on `train`; returns the final held-out metrics. The finished model goes to RUN/final (a LoRA
    model merged into a plain checkpoint). `pack`: a micro-batch's sequences end to end in rows where the model
    allows it (`packs`), not padded. `rebuild`: a new copy of the LoRA model, to gather sharded weights into."""
    pad_id = int(tokenizer.pad_token_id)
    packed, additive = packs(model, train + held_out) if pack else (False, False)
    if pack:
        log.info("%s: %s", stage, "sequences packed into rows wherever that computes fewer positions" if packed else
                 "padded rows: this model takes no packed rows (its attention, window or position ids)")  # fmt: skip
    hidden_size = getattr(model.config, "hidden_size", None)

    def batch_of(examples: list[Example]) -> Batch:
        return (
            collate_packed(examples, pad_id, additive, hidden_size) if packed else collate(examples, pad_id)
        )

    section = type(cfg).__name__.removesuffix("Config").lower()  # pretrain or sft
    plan = BatchPlan(
        len(train), cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.seed,
        accelerator.num_processes, accelerator.process_index, cfg.max_steps, f"{section}.batch_size",
        str(getattr(cfg, "train_file", "") or ""),
    )  # fmt: skip
    model.train()
    loss_fn = NextTokenLoss(model, lean_forward(model, accelerator, cfg))
    loss_fn, unwrapped, optimizer, scheduler, start, is_sharded = set_up_training(
        loss_fn, cfg, accelerator, run, checkpoint, plan.total_steps
    )
    is_main, device = accelerator.is_main_process, accelerator.device

    def save_files(path: Path, whole: dict[str, Tensor] | None) -> None:  # the main process only
        save_model_files(unwrapped.model, path, whole)
        tokenizer.save_pretrained(path)

    progress = Progress(plan.total_steps, stage, accelerator.is_main_process, quiet, initial=start)
    metrics: dict[str, Any] = {}
    half = trains_in_half(accelerator)
    for step in range(start, plan.total_steps):
        # 1. forward and backward over this process's micro-batches; loss normalised by the global token count
        global_tokens = sum(n_loss_tokens(train[i]) for i in plan.global_batch(step))
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        step_aux = torch.zeros((), dtype=torch.float64, device=device)  # a mixture of experts' balancing loss
        seen_tokens = 0
        micro = list(plan.micro_batches(step))
        for k, indices in enumerate(micro):
            batch = {name: t.to(device) for name, t in batch_of([train[i] for i in indices]).items()}
            seen_tokens += int(batch["real"].sum())
            sync = no_sync(accelerator, loss_fn, sync=k == len(micro) - 1)
            ids = batch["input_ids"]
            with sync, short_attention(ids.size(1), ids.device, half):
                loss_sum = loss_fn(ids, batch["attention_mask"], batch["labels"], batch["position_ids"])
                # DDP averages gradients over processes; scale back so the sum over the global batch is exact
                objective = loss_sum * accelerator.num_processes / global_tokens
                # a mixture of experts whose config sets `output_router_logits`: + coef x its load-balancing
                # loss, as transformers adds it, averaged over micro-batches (and, by DDP, over processes)
                if unwrapped.aux_coef is not None:
                    aux = unwrapped.aux_loss(batch["real"]) / len(micro)
                    objective = objective + unwrapped.aux_coef * aux
                    step_aux += aux.detach().double()
                accelerator.backward(objective)
            step_loss += loss_sum.detach().double()
        # 2. clip and step
        grad_norm = finite_grad_norm(
            accelerator.clip_grad_norm_(loss_fn.parameters(), cfg.max_grad_norm), f"{stage}: step {step + 1}"
        )
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the step's own, before the schedule moves on
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # 3. log
        loss = float(accelerator.reduce(step_loss, reduction="sum")) / global_tokens
        aux_metrics = {}
        if unwrapped.aux_coef is not None:  # the loss trained on: the next-token loss + coef x aux
            aux_value = float(accelerator.reduce(step_aux, reduction="mean"))
            loss += unwrapped.aux_coef * aux_value
            aux_metrics = {f"{stage}/aux_loss": aux_value}
        rate = progress.update(step, seen_tokens * accelerator.num_processes, loss=loss)
        done = step + 1
        if done % cfg.log_every == 0 or done == plan.total_steps:
            metrics = {f"{stage}/loss": loss, **aux_metrics, f"{stage}/lr": lr,
                       f"{stage}/grad_norm": float(grad_norm), f"{stage}/tokens_per_s": rate}  # fmt: skip
            run.log(done, metrics)
            progress.line(done, loss=loss)
        # 4. evaluate on the held-out split
        if done % cfg.eval_every == 0 or done == plan.total_steps:
            ev = evaluate(unwrapped, held_out, batch_of, cfg.micro_batch_size)
            run.log(done, {f"{stage}/eval_{k}": v for k, v in ev.items()})
            progress.line(done, **{f"eval_{k}": v for k, v in ev.items()})
            metrics.update({f"{stage}/eval_{k}": v for k, v in ev.items()})
        # 5. checkpoint (atomic: temp dir, then rename)
        if done % cfg.save_every == 0 or done == plan.total_steps:
            sharding.save_checkpoint(run, done, unwrapped, optimizer, scheduler, cfg, accelerator, is_sharded,
                                     save_files)  # fmt: skip
    progress.close()
    accelerator.wait_for_everyone()
    final = evaluate(unwrapped, held_out, batch_of, cfg.micro_batch_size)
    if isinstance(unwrapped.model, PeftModel):  # the adapters merged into a copy of the whole model
        assert rebuild is not None, "a LoRA model needs `rebuild`"
        whole_model = sharding.whole_model(unwrapped.model, is_sharded, is_main, rebuild)
        if is_main:
            save_policy(run.dir / "final", whole_model, tokenizer)
    else:
        whole = sharding.full_state_dict(unwrapped.model, is_main) if is_sharded else None
        if is_main:
            save_pretrained_atomic(run.dir / "final", unwrapped.model, tokenizer, state_dict=whole)
    if is_main:
        write_json(
            run.dir / "summary.json",
            {
                "stage": stage,
                "steps": plan.total_steps,
                "processes": accelerator.num_processes,
                **{f"eval_{k}": v for k, v in final.items()},
            },
        )
    run.finish()
    accelerator.wait_for_everyone()
    return final
