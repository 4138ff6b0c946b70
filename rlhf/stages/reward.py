"""`rlhf reward`: a Bradley-Terry reward model trained on human (or simulated) preferences.

Set-up: any preference format (rlhf.data.preferences) becomes PreferenceGroups, one per judgement of one prompt;
with `group_sessions`, one labeler's judgements of one prompt merge into one group, so the C(K,2) pairs of a
ranking of K answers, or a labeler's votes on them, form ONE batch element (InstructGPT, Ouyang et al. 2022,
sec. 3.5). Prompts are split into train and held-out. The model is the SFT policy with a new scalar head
(heads.build_scalar_model), dropout off, optionally LoRA adapters (merged into the weights when saved).

The loop, per optimiser step over `batch_size` groups:
  1. forward: each micro-batch's distinct completions (prompt + completion + EOS, right-padded) in ONE batched
     forward, the reward read at the last real token
  2. loss: -log sigmoid(r_chosen - r_rejected - margin) averaged within each group, then over the global batch
  3. clip and step   4. log   5. evaluate on held-out   6. checkpoint

After the loop: normalise (the SFT policy's answers to reference prompts score mean 0, optionally std 1),
save RUN/final (a plain AutoModelForSequenceClassification), and write the held-out evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import RewardConfig
from rlhf.data.jsonl import write_json
from rlhf.data.preferences import PreferenceGroup, read_preference_groups, split_by_prompt
from rlhf.data.prompts import read_prompt_rows
from rlhf.data.sources import iter_rows, text_field
from rlhf.engine import lean_llama
from rlhf.engine.decoding import SamplingParams, generate
from rlhf.engine.packing import (
    pack_rows,
    sliding_window,
    takes_4d_mask,
    takes_position_ids,
    tree_attention_mask,
    within_window,
)
from rlhf.errors import ConfigError, DataError, read_yaml
from rlhf.eval.reward_metrics import ScoredPair, write_reward_eval
from rlhf.losses import grouped_bt_loss
from rlhf.models.heads import (
    build_scalar_model,
    load_reward_model,
    load_scalar_model,
    normalisation,
    sequence_rewards,
    set_normalisation,
)
from rlhf.models.loading import (
    check_same_tokenizer,
    context_length,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    save_model_files,
    save_pretrained_atomic,
)
from rlhf.models.tokens import encode_completions, encode_prompts, end_response, stop_ids
from rlhf.models.wrappers import ModelForward
from rlhf.runs import Run, metrics_at, seed_everything
from rlhf.train import sharding
from rlhf.train.common import (
    BatchPlan,
    Progress,
    autocast,
    finite_grad_norm,
    lean_forward,
    make_accelerator,
    no_sync,
    set_up_training,
    short_attention,
    trains_in_half,
)

log = logging.getLogger(__name__)


@dataclass
class GroupExample:
    """One batch element, tokenized: every distinct completion of one judgement of one prompt."""

    prompt: str
    texts: list[str]  # the completions as text (for the evaluation report)
    sequences: list[list[int]]  # prompt + completion + EOS token ids, one per completion
    pairs: list[tuple[int, int]]  # (chosen, rejected) indices into sequences
    margins: list[float | None]  # one per pair, as the data gives them
    weight: float  # the labeler's reliability weight
    labeler: str | None

    @cached_property
    def width(self) -> int:
        """Its longest sequence: what a micro-batch holding this group is padded to, at least."""
        return max(len(s) for s in self.sequences)

    @cached_property
    def shared_width(self) -> int:
        """Its length as one row with the common prefix once (shared_prefix_row)."""
        lcp = common_prefix_length(self.sequences)
        return lcp + sum(len(s) - lcp for s in self.sequences)


@dataclass
class Batch:
    """A micro-batch: all completions of its groups in one padded tensor, pairs indexing into its rewards.

    Plain: one right-padded row per completion, the reward at the row's last real token. With a shared prefix:
    one row per group, its common prefix (the prompt) once and then each completion's rest as a branch that
    sees the prefix and itself (a tree attention mask, positions restarting after the prefix); the reward of
    completion n is read at row/column `reward_at[n]`."""

    input_ids: Tensor  # (R, T) right-padded
    attention_mask: Tensor  # (R, T), or (R, 1, T, T) with a shared prefix
    chosen_idx: Tensor  # (P,) indices into the completions' rewards
    rejected_idx: Tensor  # (P,)
    group_idx: Tensor  # (P,) which group (0..G-1) each pair belongs to
    margins: Tensor  # (P,)
    weights: Tensor  # (P,)
    num_groups: int
    n_tokens: int = 0  # real tokens forwarded
    position_ids: Tensor | None = None  # (R, T) with a shared prefix
    reward_at: Tensor | None = None  # (N, 2) row and column of each completion's last token
    # (R, T) the completions that read each position: 0 padding, k a prefix shared by k
    token_weights: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        moved: dict[str, Any] = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return dataclasses.replace(self, **moved)


# --- data ------------------------------------------------------------------------------------------------


def merge_sessions(groups: list[PreferenceGroup]) -> list[PreferenceGroup]:
    """One group per (prompt, labeler): a labeler's votes on pairs of one prompt's answers are one judgement.

    Anonymous groups (labeler None) stay apart, as they may come from different people. Order: first seen.
    """
    merged: dict[tuple[str, str], PreferenceGroup] = {}
    out: list[PreferenceGroup] = []
    for g in groups:
        if g.labeler is None:
            out.append(g)
            continue
        key = (g.prompt, g.labeler)
        if key not in merged:
            merged[key] = PreferenceGroup(g.prompt, [], [], [], g.labeler)
            out.append(merged[key])
        target = merged[key]
        for (c, r), margin in zip(g.pairs, g.margins, strict=True):
            ids = []
            for text in (g.completions[c], g.completions[r]):
                if text not in target.completions:
                    target.completions.append(text)
                ids.append(target.completions.index(text))
            target.pairs.append((ids[0], ids[1]))
            target.margins.append(margin)
    return out


def read_groups(path: str, cfg: RewardConfig, tokenizer: PreTrainedTokenizerBase) -> list[PreferenceGroup]:
    """Preference groups of a file in any format; conversational rows go through the tokenizer's chat template."""
    groups = read_preference_groups(path, cfg.format, tokenizer, cfg.skip_bad_rows, cfg.columns)
    return merge_sessions(groups) if cfg.group_sessions else groups


def warn_unmatched_labelers(
    weights: dict[str, float], groups: list[PreferenceGroup], path: str | None
) -> None:
    """A weight for a labeler the data does not hold weighs nothing, most often a misspelt name: say so, with
    the names the data does hold."""
    present = {g.labeler or "" for g in groups}
    unmatched = sorted(set(weights) - present)
    if unmatched:
        shown = ", ".join(sorted(present - {""})[:10]) or "none"
        log.warning("reward.labeler_weights (%s): no judgement in the data is by %s; its labelers: %s",
                    path, ", ".join(unmatched), shown)  # fmt: skip


def read_labeler_weights(path: str | None) -> dict[str, float]:
    """A JSON or YAML mapping labeler -> weight (>= 0), e.g. from their agreement with gold questions."""
    if path is None:
        return {}
    p = Path(path)
    mapping = read_yaml(p, "reward.labeler_weights: file", DataError)
    if not isinstance(mapping, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in mapping.values()
    ):  # an infinite weight made the loss infinite and the model NaN
        raise DataError(f"{p}: expected a mapping of labeler name -> non-negative finite weight")
    return {str(k): float(v) for k, v in mapping.items()}


def encode_groups(
    groups: list[PreferenceGroup], tokenizer: PreTrainedTokenizerBase, max_len: int, cfg: RewardConfig,
    weights: dict[str, float],
) -> tuple[list[GroupExample], int]:  # fmt: skip
    """Token ids of prompt (with the tokenizer's BOS) + completion + EOS (or the chat template's end-of-turn
    token) per completion; where they do not fit in max_len, the prompt keeps its end and then a completion is cut
    with that last token kept (the reward is read there). Groups whose labeler weighs 0 are dropped. Returns (examples, n_truncated)."""
    prompt_ids = encode_prompts(tokenizer, [g.prompt for g in groups])
    examples, truncated = [], 0
    for g, p_ids in zip(groups, prompt_ids, strict=True):
        weight = weights.get(g.labeler or "", cfg.default_labeler_weight)
        if weight == 0:
            continue
        completions = encode_completions(tokenizer, g.completions)
        # A prompt too long to leave its answers room keeps its end, in one window for the whole group (the
        # shortest any answer needs, at least half of max_len): cut from its end, the answers would all be
        # the same prompt tokens, and the labels a preference between identical sequences.
        room = max_len - max(len(c) for c in completions)
        keep = min(len(p_ids), max(room, max_len // 2))
        sequences = []
        for c_ids in completions:
            seq = [*p_ids[len(p_ids) - keep :], *c_ids]
            truncated += len(p_ids) + len(c_ids) > max_len  # this answer did not fit with its whole prompt
            if (
                len(seq) > max_len
            ):  # the answer itself is cut, its last token (EOS) kept: the reward is read there
                seq = [*seq[: max_len - 1], seq[-1]]
            sequences.append(seq)
        examples.append(
            GroupExample(g.prompt, g.completions, sequences, g.pairs, g.margins, weight, g.labeler)
        )
    return examples, truncated


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least its last token (where its reward is read)."""
    n, first = min(len(s) for s in sequences) - 1, sequences[0]
    lcp = 0
    while lcp < n and all(s[lcp] == first[lcp] for s in sequences):
        lcp += 1
    return lcp


def shared_prefix_row(sequences: list[list[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """One group as one run of tokens: (tokens, positions, branches, ends). The common prefix comes once
    (branch 0, positions 0..L-1), then sequence j's remaining tokens (branch j+1, positions from L on, as if
    alone); ends[j] is where sequence j's last token lands. A causal model gives each sequence the same hidden
    states as a forward of it alone, provided a branch sees only the prefix and itself (tree_attention_mask)."""
    lcp = common_prefix_length(sequences)
    tokens, positions, branches, ends = list(sequences[0][:lcp]), list(range(lcp)), [0] * lcp, []
    for j, s in enumerate(sequences):
        tokens += s[lcp:]
        positions += range(lcp, len(s))
        branches += [j + 1] * (len(s) - lcp)
        ends.append(len(tokens) - 1)
    return tokens, positions, branches, ends


def collate(
    examples: list[GroupExample], pad_id: int, use_margins: bool = True, shared_prefix: bool = False,
    additive_mask: bool = False,
) -> Batch:  # fmt: skip
    """Stack every completion of the micro-batch's groups, right-padded, and index the pairs into them; with
    `shared_prefix`, each group's prefix once (shared_prefix_row) and groups packed into rows (pack_rows).
    Margins the data lacks (or all, without `use_margins`) are 0."""
    position_ids: Tensor | None = None
    reward_at: Tensor | None = None
    if shared_prefix:
        layouts = [shared_prefix_row(e.sequences) for e in examples]
        rows = pack_rows([len(tokens) for tokens, *_ in layouts])
        width = max(sum(len(layouts[g][0]) for g in members) for members in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        group_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        branch_ids = torch.zeros((len(rows), width), dtype=torch.long)
        token_weights = torch.zeros((len(rows), width), dtype=torch.long)
        ends_at: list[list[tuple[int, int]]] = [[] for _ in examples]
        for r, members in enumerate(rows):
            col = 0
            for g in members:
                tokens, positions, branches, ends = layouts[g]
                span = slice(col, col + len(tokens))
                input_ids[r, span], position_ids[r, span] = torch.tensor(tokens), torch.tensor(positions)
                group_ids[r, span], branch_ids[r, span] = g, torch.tensor(branches)
                token_weights[r, span] = torch.where(branch_ids[r, span] == 0, len(ends), 1)  # ends: one each
                ends_at[g] = [(r, col + end) for end in ends]
                col += len(tokens)
        reward_at = torch.tensor([at for group in ends_at for at in group])  # completions in example order
        attention_mask = tree_attention_mask(group_ids, branch_ids, additive_mask)
        n_tokens = sum(len(tokens) for tokens, *_ in layouts)
    else:
        sequences = [s for e in examples for s in e.sequences]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, s in enumerate(sequences):
            input_ids[row, : len(s)] = torch.tensor(s)
            attention_mask[row, : len(s)] = 1
        n_tokens = sum(len(s) for s in sequences)
        token_weights = attention_mask
    chosen, rejected, group, margins, weights = [], [], [], [], []
    offset = 0
    for g, e in enumerate(examples):
        for (c, r), m in zip(e.pairs, e.margins, strict=True):
            chosen.append(offset + c)
            rejected.append(offset + r)
            group.append(g)
            margins.append(float(m) if use_margins and m is not None else 0.0)
            weights.append(e.weight)
        offset += len(e.sequences)
    return Batch(
        input_ids, attention_mask, torch.tensor(chosen), torch.tensor(rejected), torch.tensor(group),
        torch.tensor(margins), torch.tensor(weights), len(examples), n_tokens, position_ids, reward_at,
        token_weights,
    )  # fmt: skip


def micro_batches_by_length(
    plan: BatchPlan, step: int, examples: list[GroupExample], shared_prefix: bool = False
) -> list[list[int]]:
    """This process's share of the step's groups, sorted by the width of their rows before cutting into
    micro-batches, so each forward pads less; the step's gradient is the same sum over the same groups."""

    def width(i: int) -> int:
        return examples[i].shared_width if shared_prefix else examples[i].width

    mine = sorted((i for mb in plan.micro_batches(step) for i in mb), key=width)
    return [mine[k : k + plan.micro_batch_size] for k in range(0, len(mine), plan.micro_batch_size)]


def uses_shared_prefix(cfg: RewardConfig, model: torch.nn.Module) -> tuple[bool, bool]:
    """(shared prefix on, additive mask): on when configured, the attention takes a custom 4-D mask, no sliding
    window is shorter than `max_seq_len` (the custom mask would drop it), and the model's forward takes the
    position ids that restart each branch (`takes_position_ids`)."""
    works, additive = takes_4d_mask(model)
    works = works and within_window(sliding_window(model), cfg.max_seq_len) and takes_position_ids(model)
    return cfg.shared_prefix and works, additive


def scalar_head(model: torch.nn.Module) -> torch.nn.Module:
    """The head module inside DDP and peft wrappers (with LoRA, peft's trainable copy of it)."""
    inner = getattr(model, "module", model)
    get_base = getattr(inner, "get_base_model", None)
    inner = get_base() if get_base is not None else inner
    return cast(torch.nn.Module, getattr(inner, "score", None) or inner.classifier)


class RewardForward(ModelForward):
    """One reward per completion, (N,): the scalar head at the completion's last real token.

    With `lean`, the head runs only at those N tokens. Otherwise the model's own forward: its pooling finds the
    last non-PAD token (PAD differs from EOS); with a shared prefix, the head's output at every position is
    caught on its way out and read at `reward_at`.
    """

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None, reward_at: Tensor | None
    ) -> Tensor:
        if self.lean:
            device = input_ids.device
            if reward_at is None:  # one right-padded row per completion
                rows = torch.arange(input_ids.size(0), device=device)
                reward_at = torch.stack([rows, attention_mask.sum(1) - 1], dim=1)  # (N, 2)
            if position_ids is None:  # positions from 0, as in the model's own forward
                position_ids = torch.arange(input_ids.size(1), device=device).expand_as(input_ids)
            hidden = lean_llama.hidden_states(self.model, input_ids, attention_mask, position_ids)
            # the head at the N last tokens of the (R, T, d) states
            return cast(Tensor, self.model.score(hidden[reward_at[:, 0], reward_at[:, 1]]))[:, 0].float()
        if reward_at is None:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return cast(Tensor, out.logits[:, 0].float())  # (N,)
        caught: list[Tensor] = []
        hook = scalar_head(self.model).register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False)  # fmt: skip
        finally:
            hook.remove()
        scores = caught[-1]  # (R, T, 1)
        return scores[reward_at[:, 0], reward_at[:, 1], 0].float()  # (N,)


def forward_rewards(scorer: torch.nn.Module, batch: Batch) -> Tensor:
    """The rewards of a micro-batch's completions, (N,), through a RewardForward (or its DDP wrapper)."""
    return cast(Tensor, scorer(batch.input_ids, batch.attention_mask, batch.position_ids, batch.reward_at))


# --- evaluation -------------------------------------------------------------------------------------------


@torch.no_grad()
def score_pairs(
    scorer: RewardForward,
    examples: list[GroupExample],
    pad_id: int,
    cfg: RewardConfig,
    accelerator: Accelerator,
) -> tuple[float, list[ScoredPair]]:
    """(mean group loss, every pair with its raw rewards) over the held-out groups."""
    was_training = scorer.training
    scorer.eval()
    total, pairs = 0.0, []
    device = next(scorer.parameters()).device  # the training device, or the CPU for a rebuilt whole copy
    for i in range(0, len(examples), cfg.micro_batch_size):
        chunk = examples[i : i + cfg.micro_batch_size]
        batch = collate(chunk, pad_id, cfg.use_margins, *uses_shared_prefix(cfg, scorer.model)).to(device)
        with autocast(accelerator):
            rewards = forward_rewards(scorer, batch)  # (N,)
        loss, _ = grouped_bt_loss(
            rewards,
            batch.chosen_idx,
            batch.rejected_idx,
            batch.group_idx,
            batch.num_groups,
            batch.margins,
            batch.weights,
        )
        total += float(loss) * len(chunk)
        flat = rewards.tolist()
        offset = 0
        for e in chunk:
            for (c, r), margin in zip(e.pairs, e.margins, strict=True):
                pairs.append(ScoredPair(e.prompt, e.texts[c], e.texts[r], flat[offset + c], flat[offset + r],
                                        e.labeler, margin))  # fmt: skip
            offset += len(e.sequences)
    scorer.train(was_training)
    return total / max(1, len(examples)), pairs


# --- normalisation ----------------------------------------------------------------------------------------


def read_reference(
    cfg: RewardConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[tuple[str, str]], list[str]]:
    """The normalisation's given (prompt, completion) rows, or its prompts (either may be empty: then the
    preference data's prompts are answered). Read before training: a bad file fails before any work."""
    norm = cfg.normalise
    if not norm.enabled:
        return [], []
    if norm.completions_file:
        rows = [(text_field(r, "prompt", where), text_field(r, "completion", where))
                for where, r in iter_rows(norm.completions_file)]  # fmt: skip
        if not rows:
            raise DataError(f"{norm.completions_file}: no completions (empty file)")
        return rows, []
    if norm.prompts_file:
        return [], [prompt for _, prompt in read_prompt_rows(norm.prompts_file, 0, tokenizer)]
    return [], []


def answerable(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """The prompts' ids, less those with no token to answer from (an empty prompt, without a BOS token)."""
    return [ids for ids in encode_prompts(tokenizer, prompts) if ids]


def reference_sequences(
    cfg: RewardConfig,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_len: int,
    given: tuple[list[tuple[str, str]], list[str]] | None = None,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """prompt + answer + EOS (or end-of-turn) ids of the reference answers: a given file, or the SFT policy's
    samples on `device` (of normalise.prompts_file's prompts, else of `prompts`). `given`: what read_reference
    read."""
    norm = cfg.normalise
    stops = stop_ids(tokenizer)
    completions, given_prompts = read_reference(cfg, tokenizer) if given is None else given
    if completions:
        p_ids = encode_prompts(tokenizer, [p for p, _ in completions])
        c_ids = encode_completions(tokenizer, [c for _, c in completions])
        return [[*p, *c][-max_len:] for p, c in zip(p_ids, c_ids, strict=True)]
    p_ids = answerable(tokenizer, sorted(set(given_prompts or prompts)))
    random.Random(cfg.seed).shuffle(p_ids)
    p_ids = p_ids[: norm.n_prompts]
    policy = load_causal_lm(norm.policy or cfg.model, tokenizer=tokenizer).to(device)
    policy.eval()
    params = SamplingParams(norm.max_new_tokens, norm.temperature, 0, norm.top_p, cfg.seed)
    sequences = []
    for i in range(0, len(p_ids), 128):
        gen = generate(policy, p_ids[i : i + 128], params, stops, tokenizer.pad_token_id)
        for p, ids, mask in zip(
            p_ids[i : i + 128], gen.response_ids.tolist(), gen.response_mask.tolist(), strict=True
        ):
            answer = [t for t, m in zip(ids, mask, strict=True) if m]
            sequences.append([*p, *end_response(answer, stops)][-max_len:])
    return sequences


@torch.no_grad()
def normalise(
    model: PreTrainedModel, sequences: list[list[int]], pad_id: int, scale: bool, batch: int = 64
) -> dict[str, float]:
    """Set shift (and scale) in the model's config so the reference sequences score mean 0 (std 1)."""
    model.eval()
    rewards = []
    device = next(model.parameters()).device
    for i in range(0, len(sequences), batch):
        chunk = sequences[i : i + batch]
        ids = torch.full((len(chunk), max(len(s) for s in chunk)), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(chunk):
            ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
        rewards.append(sequence_rewards(model, ids.to(device), mask.to(device), normalise=False))
    r = torch.cat(rewards)  # (R,)
    shift = float(r.mean())
    std = float(r.std(unbiased=False)) if len(r) > 1 else 1.0
    set_normalisation(model, shift, std if scale and std > 0 else 1.0)
    return {"reference_n": len(r), "reference_mean": shift, "reference_std": std}


# --- the model ----------------------------------------------------------------------------------------------


def load_model(
    cfg: RewardConfig, checkpoint: Path | None, tokenizer: PreTrainedTokenizerBase
) -> torch.nn.Module:
    """The SFT checkpoint with a new scalar head, or `init_from` (warm start), or the checkpoint to resume;
    with LoRA, wrapped by peft."""
    model: torch.nn.Module
    pad_id = tokenizer.pad_token_id
    if checkpoint and cfg.lora.r == 0:
        base = load_scalar_model(str(checkpoint), tokenizer=tokenizer)
    elif cfg.init_from:  # a reward model: a causal LM here would get a random head, not a warm start
        base = load_reward_model(cfg.init_from, tokenizer=tokenizer)
    else:
        base = build_scalar_model(cfg.model, seed=cfg.seed, tokenizer=tokenizer)
    if cfg.lora.r == 0:
        model = base
    else:
        from peft import PeftModel

        from rlhf.models.lora import add_lora

        base.config.pad_token_id = pad_id
        if checkpoint:
            model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
        else:
            # the head trains fully
            model = add_lora(base, cfg.lora, "SEQ_CLS", ["score"])
    # the model's own pooling finds the last real token as the last non-PAD one
    model.config.pad_token_id = pad_id  # type: ignore[union-attr]
    disable_dropout(model)
    return model


def plain_model(model: torch.nn.Module) -> PreTrainedModel:
    """The model as a plain AutoModelForSequenceClassification: LoRA adapters merged into the weights."""
    merge = getattr(model, "merge_and_unload", None)
    merged = merge() if merge is not None else model
    assert isinstance(merged, PreTrainedModel)
    return merged


# --- the stage ----------------------------------------------------------------------------------------------


def run(cfg: RewardConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    accelerator = make_accelerator(cfg.precision, cfg.log_with, cfg.out_dir)
    seed_everything(cfg.seed + accelerator.process_index)
    tokenizer = load_tokenizer(cfg.model, cfg.add_pad_token)
    if cfg.init_from:  # its embeddings read the ids of reward.model's tokenizer, which the run saves with it
        check_same_tokenizer(
            tokenizer, load_tokenizer(cfg.init_from, cfg.add_pad_token), "reward.model", "reward.init_from"
        )
    pad_id = int(tokenizer.pad_token_id)
    # Read everything before any output: a malformed row fails with file:line and leaves nothing behind.
    groups = read_groups(cfg.train_file, cfg, tokenizer)
    reference_rows = read_reference(cfg, tokenizer)
    if cfg.normalise.enabled and not reference_rows[0]:
        prompts = reference_rows[1] or [g.prompt for g in groups]
        if prompts and not answerable(tokenizer, prompts):  # no prompts at all: no comparisons (below)
            source = cfg.normalise.prompts_file or cfg.train_file
            raise DataError(f"{source}: every prompt is empty, so the policy has nothing to answer for the "
                            "normalisation: give reward.normalise.prompts_file or completions_file")  # fmt: skip
    if cfg.eval_file:
        train_groups, held_groups = groups, read_groups(cfg.eval_file, cfg, tokenizer)
    else:
        train_groups, held_groups = split_by_prompt(groups, cfg.eval_fraction, cfg.seed)
    weights = read_labeler_weights(cfg.labeler_weights)
    warn_unmatched_labelers(weights, train_groups + held_groups, cfg.labeler_weights)

    run_dir = Run(cfg.out_dir, cfg, accelerator.is_main_process, accelerator, resume=resume)
    checkpoint = run_dir.latest_checkpoint() if resume else None
    model = load_model(cfg, checkpoint, tokenizer)
    max_len = min(cfg.max_seq_len, context_length(cast(PreTrainedModel, model)))
    context = context_length(cast(PreTrainedModel, model))  # the policy's: the reward model is made from it
    if cfg.normalise.enabled and not reference_rows[0] and cfg.normalise.max_new_tokens >= context:
        raise ConfigError(f"reward.normalise.max_new_tokens ({cfg.normalise.max_new_tokens}) leaves no room for a "
                          f"prompt in the model's context of {context} tokens: lower it")  # fmt: skip
    train, truncated = encode_groups(train_groups, tokenizer, max_len, cfg, weights)
    held_out, held_truncated = encode_groups(held_groups, tokenizer, max_len, cfg, weights)
    # what to change where nothing is held out: the held-out file, or the share of the training file
    where = (f"reward.eval_file {cfg.eval_file} has none" if cfg.eval_file
             else "set reward.eval_fraction > 0, or reward.eval_file")  # fmt: skip
    if held_groups and not held_out:
        log.warning("reward: every held-out judgement is by a labeler weighted 0: nothing is held out to "
                    "evaluate on (%s)", "give them another weight" if cfg.eval_file else "set eval_file, or "
                    "another weight")  # fmt: skip
    elif not held_groups:
        log.warning("reward: no held-out judgement compares two answers, so there is no held-out accuracy (%s)",
                    where)  # fmt: skip
    if truncated or held_truncated:
        log.warning("reward: %d answers did not fit in %d tokens with their prompt: the prompt keeps its end, "
                    "then the answer is cut (its EOS kept last)", truncated + held_truncated, max_len)  # fmt: skip
    if not train:
        raise DataError(f"{cfg.train_file}: no comparisons to train on (all ties, or every labeler weighs 0)")
    n_pairs = sum(len(e.pairs) for e in train)
    log.info("reward: %d groups (%d pairs) to train on, %d groups (%d pairs) held out",
             len(train), n_pairs, len(held_out), sum(len(e.pairs) for e in held_out))  # fmt: skip

    plan = BatchPlan(
        len(train), cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.seed,
        accelerator.num_processes, accelerator.process_index, cfg.max_steps, "reward.batch_size", str(cfg.train_file),
    )  # fmt: skip
    model.train()
    scorer = RewardForward(model, lean_forward(model, accelerator, cfg))
    is_main = accelerator.is_main_process
    scorer, unwrapped, optimizer, scheduler, start, is_sharded = set_up_training(
        scorer, cfg, accelerator, run_dir, checkpoint, plan.total_steps
    )
    shared = uses_shared_prefix(cfg, model)
    half = trains_in_half(accelerator)
    if cfg.shared_prefix and not shared[0]:
        log.info(
            "reward: shared_prefix needs sdpa or eager attention, no ALiBi and no sliding window shorter than "
            "max_seq_len; one row per completion instead"
        )

    def save_files(path: Path, whole: dict[str, Tensor] | None) -> None:  # the main process only
        save_model_files(unwrapped.model, path, whole)  # with LoRA: the adapter and the head
        tokenizer.save_pretrained(path)

    progress = Progress(plan.total_steps, "reward", accelerator.is_main_process, quiet, initial=start)
    # resumed: the metrics of the checkpoint's step, reported as they were when no step is left to train
    metrics: dict[str, Any] = metrics_at(run_dir.metrics_path, start) if is_main else {}
    pairs_seen, t0 = 0, time.perf_counter()
    for step in range(start, plan.total_steps):
        global_groups = plan.batch_size
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        # a mixture of experts' load-balancing loss
        step_aux = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        step_correct = step_pairs = step_tokens = 0
        micro = micro_batches_by_length(plan, step, train, shared[0])
        for k, indices in enumerate(micro):
            batch = collate([train[i] for i in indices], pad_id, cfg.use_margins, *shared).to(
                accelerator.device
            )
            step_tokens += batch.n_tokens
            sync = no_sync(accelerator, scorer, sync=k == len(micro) - 1)
            with sync, short_attention(batch.input_ids.size(1), batch.input_ids.device, half):
                # 1. forward: all distinct completions of these groups at once, rewards at the last real token
                rewards = forward_rewards(scorer, batch)  # (N,)
                # 2. loss: mean over each group's pairs, then over groups; scaled to the global batch
                loss, _ = grouped_bt_loss(
                    rewards, batch.chosen_idx, batch.rejected_idx, batch.group_idx, batch.num_groups,
                    batch.margins, batch.weights,
                )  # fmt: skip
                # a mixture of experts' load-balancing loss, where its config sets `output_router_logits`
                if unwrapped.aux_coef is not None:
                    assert batch.token_weights is not None
                    aux = unwrapped.aux_loss(batch.token_weights)
                    loss = loss + unwrapped.aux_coef * aux
                    step_aux += aux.detach().double() * batch.num_groups
                accelerator.backward(loss * batch.num_groups * accelerator.num_processes / global_groups)
            step_loss += loss.detach().double() * batch.num_groups
            step_pairs += len(batch.chosen_idx)
            step_correct += int((rewards[batch.chosen_idx] > rewards[batch.rejected_idx]).sum())
        # 3. clip and step
        grad_norm = finite_grad_norm(
            accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm), f"reward: step {step + 1}"
        )
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the step's own, before the schedule moves on
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # 4. log: loss and accuracy over every process's groups and pairs
        sums = torch.tensor(
            [float(step_loss), step_correct, step_pairs, float(step_aux)],
            dtype=torch.float64, device=accelerator.device,
        )  # fmt: skip
        loss_sum, correct, pairs, aux_sum = accelerator.reduce(
            sums, reduction="sum"
        ).tolist()  # one collective for the four
        loss_value, step_correct, step_pairs = loss_sum / global_groups, int(correct), int(pairs)
        pairs_seen += step_pairs
        rate = pairs_seen / max(1e-9, time.perf_counter() - t0)
        progress.update(step, step_tokens * accelerator.num_processes, loss=loss_value)
        done = step + 1
        if done % cfg.log_every == 0 or done == plan.total_steps:
            metrics = {"rm/loss": loss_value, "rm/accuracy": step_correct / max(1, step_pairs),
                       "rm/lr": lr, "rm/grad_norm": float(grad_norm),
                       "rm/pairs_per_s": rate}  # fmt: skip
            if unwrapped.aux_coef is not None:  # rm/loss holds coef x this
                metrics["rm/aux_loss"] = aux_sum / global_groups
            run_dir.log(done, metrics)
            progress.line(done, loss=loss_value, pairs_per_s=rate)
        # 5. evaluate on the held-out prompts
        if held_out and (done % cfg.eval_every == 0 or done == plan.total_steps):
            eval_loss, scored = score_pairs(unwrapped, held_out, pad_id, cfg, accelerator)
            ev = {"rm/eval_loss": eval_loss, "rm/eval_accuracy": sum(p.correct for p in scored) / len(scored)}
            run_dir.log(done, ev)
            progress.line(done, **{k.split("/")[1]: v for k, v in ev.items()})
            metrics.update(ev)
        # 6. checkpoint (atomic: temp dir, then rename)
        if done % cfg.save_every == 0 or done == plan.total_steps:
            sharding.save_checkpoint(run_dir, done, unwrapped, optimizer, scheduler, cfg, accelerator, is_sharded,
                                     save_files)  # fmt: skip
    progress.close()
    accelerator.wait_for_everyone()

    # After training: held-out scores, normalisation on the SFT policy's answers, the final model, the report.
    result: dict[str, Any] = {"steps": plan.total_steps, "train_groups": len(train), "train_pairs": n_pairs,
                              "truncated": truncated + held_truncated, **metrics}  # fmt: skip
    if (
        is_sharded
    ):  # the main process goes on with a whole copy: the model rebuilt, the gathered weights loaded
        whole = sharding.full_state_dict(unwrapped.model, is_main)
        if is_main:
            rebuilt = load_model(cfg, None, tokenizer)
            sharding.load_whole(rebuilt, cast(dict[str, Tensor], whole))
            unwrapped = RewardForward(rebuilt.eval())
    if is_main:
        scored = score_pairs(unwrapped, held_out, pad_id, cfg, accelerator)[1] if held_out else []
        final = plain_model(unwrapped.model)
        if cfg.normalise.enabled:
            reference = reference_sequences(
                cfg, tokenizer, [g.prompt for g in groups], max_len, reference_rows, accelerator.device
            )
            result.update(normalise(final, reference, pad_id, cfg.normalise.scale))
        # the constants the saved model applies: a warm start keeps its own when not normalised here
        shift, scale = normalisation(final)
        save_pretrained_atomic(run_dir.dir / "final", final, tokenizer)
        report = write_reward_eval(
            run_dir.dir, scored, shift, scale, train_pairs=n_pairs, train_groups=len(train)
        )
        result["eval"] = report
        write_json(
            run_dir.dir / "summary.json",
            {"stage": "reward", **{k: v for k, v in result.items() if k != "eval"}},
        )
    run_dir.finish()
    accelerator.wait_for_everyone()
    return result
