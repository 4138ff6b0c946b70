"""`rlhf dpo`: direct preference optimisation, the policy trained on preference pairs with no reward model and
no sampling (Rafailov et al. 2023, arXiv:2305.18290); IPO, conservative DPO, SimPO and ORPO are options of the loss,
and so is KTO, which trains on answers judged one at a time (feedback records, and the comparisons' winners and
losers), each judgement reading another's answer as well for KTO's reference point.

Set-up: the preference data the reward model trains on, in any format (rlhf.data.preferences); a ranking of K
answers becomes one example holding its C(K,2) pairs, each answer forwarded once. Prompts are split into train
and held-out. The policy is the SFT checkpoint (full or LoRA), dropout off. The reference's log-probs of every
answer are computed once before training and cached in RUN/reference_logps.pt (TRL's `precompute_ref_log_probs`):
the reference is then never run again, and with LoRA it is the policy with its adapter switched off, so no
second copy of the model exists at all. SimPO and ORPO need no reference.

The loop, per optimiser step over `batch_size` judgements:
  1. forward: each judgement's prompt once and its answers as branches (a tree attention mask), judgements
     packed into rows, the LM head only at answer tokens; each answer's log-prob summed (and averaged, for
     SimPO) over its tokens
  2. loss over the pairs, weighted so the step's loss is the mean over all its pairs
  3. clip and step   4. log (loss, reward accuracy, implicit-reward margins, pairs/s)
  5. evaluate on held-out   6. checkpoint (atomic)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from peft import PeftModel
from torch import Tensor
from transformers import AutoConfig, PreTrainedTokenizerBase

from rlhf.config import DPOConfig
from rlhf.config.preference import REFERENCE_FREE
from rlhf.data.jsonl import write_json
from rlhf.data.preferences import (
    Feedback,
    PreferenceGroup,
    Record,
    Render,
    chat_template,
    read_preference_groups,
    read_preferences,
    render_feedback,
    split_by_prompt,
    to_groups,
)
from rlhf.engine import lean_llama
from rlhf.engine.packing import (
    pack_rows,
    row_width,
    sliding_window,
    takes_4d_mask,
    tree_attention_mask,
    within_window,
)
from rlhf.errors import DataError
from rlhf.losses import Stats, dpo_loss, kto_loss, orpo_loss, simpo_loss
from rlhf.models.loading import (
    check_same_tokenizer,
    context_length,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    save_model_files,
)
from rlhf.models.lora import trainable_causal_lm
from rlhf.models.tokens import encode_completions, encode_prompts
from rlhf.models.wrappers import Actor
from rlhf.rl_math import logprobs_from_logits
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
    save_policy,
    set_up_training,
    short_attention,
    trains_in_half,
)

log = logging.getLogger(__name__)
REFERENCE_CACHE = "reference_logps.pt"
REWARDS = ("dpo/chosen_reward", "dpo/rejected_reward")  # each a mean over its own answers (reward_means)
REWARD_COUNTS = tuple(f"{key}_n" for key in REWARDS)
CollateFn = Callable[[list["Judgement"]], "Batch"]


@dataclass
class Judgement:
    """One example: a prompt, its distinct answers (token ids, EOS last if the answer ends) and the pairs."""

    prompt: str
    prompt_ids: list[int]
    answers: list[list[int]]
    pairs: list[tuple[int, int]]  # (chosen, rejected) indices into answers
    ref_logps: list[float] | None = None  # the reference's log-prob of each answer, once cached
    labels: list[bool | None] | None = None  # KTO: each answer desirable or not; None: not trained on
    kl_answers: int = 0  # KTO: the last answers are another judgement's, for the KL estimate

    @property
    def terms(self) -> int:
        """How many terms of the loss it holds: its pairs, or with KTO its judged answers."""
        return len(self.pairs) if self.labels is None else sum(label is not None for label in self.labels)


@dataclass
class Batch:
    """A micro-batch laid out for one forward: S answers, N answer tokens, the pairs indexing into the answers.

    Shared prefix (`collate(..., shared_prefix=True)`): one run of tokens per judgement, its prompt once and then
    each answer as a branch that sees the prompt and itself (a tree attention mask, positions restarting after
    the prompt, as rlhf.stages.reward does for the reward model), judgements packed into rows. Otherwise one
    right-padded row per prompt + answer. Either way `response_at` indexes the flattened (R x W) outputs at the
    position that predicts each answer token: for an answer's first token, the prompt's last.
    """

    input_ids: Tensor  # (R, W)
    attention_mask: Tensor  # (R, W), or (R, 1, W, W) with a shared prefix
    position_ids: Tensor  # (R, W)
    response_at: Tensor  # (N,)
    tokens: Tensor  # (N,) the answer tokens
    answer_of: Tensor  # (N,) which of the S answers each token belongs to
    n_answers: int
    chosen: Tensor  # (Q,) indices into the S answers
    rejected: Tensor  # (Q,)
    ref_logps: Tensor  # (S,) zeros until cached
    token_weights: Tensor  # (R, W) the answers that read each position: 0 padding, k a prompt shared by k
    labels: Tensor  # (S,) KTO: 1 desirable, 0 undesirable, -1 not judged (every answer of a DPO batch)
    kl_answers: Tensor  # (S,) bool, KTO: answers to another prompt, for the KL estimate
    n_terms: int  # the loss terms: pairs, or with KTO judged answers

    def reward_counts(self) -> tuple[int, int]:
        """How many answers `dpo/chosen_reward` and `dpo/rejected_reward` are means over: one of each per pair,
        or with KTO the desirable and the undesirable answers."""
        if bool((self.labels >= 0).any()):
            return int((self.labels == 1).sum()), int((self.labels == 0).sum())
        return len(self.chosen), len(self.rejected)

    def to(self, device: torch.device) -> Batch:
        moved: dict[str, Any] = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return dataclasses.replace(self, **moved)


# --- data --------------------------------------------------------------------------------------------------


def read_judgements(
    path: str, cfg: DPOConfig, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> tuple[list[Judgement], int]:
    """Every judgement of a preference file as token ids; (judgements, answers cut to max_len). With KTO, every
    answer judged alone (`feedback` records) and those a comparison ranks (kto_labels)."""
    if cfg.loss == "kto":
        records = read_preferences(path, cfg.format, cfg.skip_bad_rows, cfg.columns)
        try:
            groups, labels = kto_labels(records, chat_template(tokenizer))
        except ValueError as e:  # conversational rows without a (usable) chat template
            raise DataError(f"{path}: {e}") from None
    else:
        groups, labels = (
            read_preference_groups(path, cfg.format, tokenizer, cfg.skip_bad_rows, cfg.columns),
            None,
        )
    try:
        return encode(groups, tokenizer, max_len, labels)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def kto_labels(
    records: list[Record], render: Render | None
) -> tuple[list[PreferenceGroup], list[list[bool | None]]]:
    """KTO's judged answers: a feedback record's answer as labelled, and of a comparison (pair, vote, ranking,
    ratings) each answer that only wins desirable and each that only loses undesirable (TRL's unpairing; a
    ranking's middle answers, which do both, are not judged). One group per judgement, with its labels."""
    groups: list[PreferenceGroup] = []
    labels: list[list[bool | None]] = []
    for r in records:
        if (
            isinstance(r, Feedback) and r.meta.get("is_gold") is not True
        ):  # gold items check labelers, as in to_groups
            f = render_feedback(r, render)
            assert isinstance(f.prompt, str) and isinstance(f.completion, str)
            groups.append(PreferenceGroup(f.prompt, [f.completion], [], [None], f.labeler))
            labels.append([f.label])
    for g in to_groups([r for r in records if not isinstance(r, Feedback)], render):
        wins, losses = {c for c, _ in g.pairs}, {r for _, r in g.pairs}
        groups.append(g)
        labels.append(
            [None if (k in wins) == (k in losses) else k in wins for k in range(len(g.completions))]
        )
    return groups, labels


def add_kl_answers(items: list[Judgement], max_len: int) -> None:
    """KTO's reference point: each judgement also reads the first judged answer of the next judgement on another
    prompt (wrapping round), cut to fit its prompt's window, as TRL pairs each prompt with another's completion;
    one whose prompt no other judgement shares reads none."""
    firsts = [next(a for a, label in zip(j.answers, j.labels or [], strict=True) if label is not None)
              for j in items]  # fmt: skip
    for i, j in enumerate(items):
        # the next on another prompt: rows of one prompt often come together (several answers judged in turn)
        n = next((n for n in range(1, len(items)) if items[(i + n) % len(items)].prompt != j.prompt), None)
        other = [] if n is None else firsts[(i + n) % len(items)][: max_len - len(j.prompt_ids)]
        if other and j.labels is not None:
            j.answers.append(other)
            j.labels.append(None)
            j.kl_answers = 1


def encode(
    groups: list[PreferenceGroup], tokenizer: PreTrainedTokenizerBase, max_len: int,
    labels: list[list[bool | None]] | None = None,
) -> tuple[list[Judgement], int]:  # fmt: skip
    """prompt ids (with the tokenizer's BOS) and answer + EOS (or end-of-turn) ids; a prompt longer than half of
    max_len keeps its end, then an answer that does not fit is cut (no EOS: it did not end within the window).
    With KTO's `labels` (one list per group), the judged answers alone."""
    truncated, alike, out = 0, 0, []
    for n, g in enumerate(groups):
        if labels is not None:  # KTO: the judged answers, each trained on alone
            judged = [
                (c, label) for c, label in zip(g.completions, labels[n], strict=True) if label is not None
            ]
            if not judged:
                continue
            g = PreferenceGroup(g.prompt, [c for c, _ in judged], [], [], g.labeler)
        prompt = encode_prompts(tokenizer, [g.prompt])[0]
        answers = []
        for ids in encode_completions(tokenizer, g.completions):
            p = prompt if len(prompt) + len(ids) <= max_len else prompt[-(max_len // 2) :]
            truncated += len(prompt) + len(ids) > max_len  # this answer did not fit with its whole prompt
            if len(p) + len(ids) > max_len:
                ids = ids[: max_len - len(p)]
            answers.append(ids)
        # one prompt window for the whole judgement: the shortest any answer needed
        p_len = min(len(prompt), *(max_len - len(a) for a in answers))
        if p_len == 0:  # no position to predict an answer's first token from
            raise DataError(
                f"a judgement with an empty prompt cannot be trained on (answers {g.completions[:2]!r})"
            )
        if labels is not None:
            kept: list[bool | None] = [label for _, label in judged]
            out.append(Judgement(g.prompt, prompt[len(prompt) - p_len :], answers, [], labels=kept))
            continue
        # two answers cut to the same tokens teach nothing (a loss of log 2 and no gradient), and would count
        # as a miss in dpo/accuracy
        pairs = [(c, r) for c, r in g.pairs if answers[c] != answers[r]]
        alike += len(g.pairs) - len(pairs)
        if pairs:
            out.append(Judgement(g.prompt, prompt[len(prompt) - p_len :], answers, pairs))
    if alike:
        log.warning("dpo: %d pairs whose answers are the same once cut to %d tokens left out", alike, max_len)
    return out, truncated


def judgement_run(j: Judgement) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """One judgement as one run of tokens: (tokens, positions, branches, where each answer token is predicted).
    The prompt (branch 0, positions 0..P-1) once, then answer k (branch k + 1, positions from P on)."""
    n = len(j.prompt_ids)
    tokens, positions, branches, predicted_at = list(j.prompt_ids), list(range(n)), [0] * n, []
    for k, answer in enumerate(j.answers):
        start = len(tokens)
        tokens += answer
        positions += range(n, n + len(answer))
        branches += [k + 1] * len(answer)
        predicted_at.append([n - 1, *range(start, start + len(answer) - 1)])
    return tokens, positions, branches, predicted_at


def collate(
    items: list[Judgement], pad_id: int, shared_prefix: bool = True, additive: bool = False,
    hidden_size: int | None = None,
) -> Batch:  # fmt: skip
    """The micro-batch's answers laid out for one forward (see Batch): a shared prefix where the attention
    takes a 4-D mask, else padded rows."""
    if shared_prefix:
        runs = [judgement_run(j) for j in items]
        lengths = [len(tokens) for tokens, *_ in runs]
    else:  # one run per answer: its prompt, then it
        runs = [judgement_run(Judgement(j.prompt, j.prompt_ids, [a], [])) for j in items for a in j.answers]
        lengths = [len(tokens) for tokens, *_ in runs]
    width = row_width(lengths, hidden_size) if shared_prefix else max(lengths)
    rows = pack_rows(lengths, width) if shared_prefix else [[i] for i in range(len(runs))]
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    group_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    branch_ids = torch.zeros((len(rows), width), dtype=torch.long)
    token_weights = torch.zeros((len(rows), width), dtype=torch.long)
    predicted_at: list[list[int]] = [[] for _ in runs]  # per run: flat output index of each answer token
    for r, members in enumerate(rows):
        col = 0
        for g in members:
            tokens, positions, branches, at = runs[g]
            span = slice(col, col + len(tokens))
            input_ids[r, span], position_ids[r, span] = torch.tensor(tokens), torch.tensor(positions)
            group_ids[r, span], branch_ids[r, span] = g, torch.tensor(branches)
            token_weights[r, span] = torch.where(branch_ids[r, span] == 0, len(at), 1)  # at: one per answer
            predicted_at[g] = [r * width + col + i for answer in at for i in answer]
            col += len(tokens)
    answers = [a for j in items for a in j.answers]
    response_at = torch.tensor([i for g in range(len(runs)) for i in predicted_at[g]])  # answers in order
    answer_tokens = torch.tensor([t for a in answers for t in a])
    answer_of = torch.tensor([k for k, a in enumerate(answers) for _ in a])
    if shared_prefix:
        attention_mask = tree_attention_mask(group_ids, branch_ids, additive)
    else:
        attention_mask = (group_ids >= 0).long()
    chosen, rejected, ref, labels, kl, offset = [], [], [], [], [], 0
    for j in items:
        chosen += [offset + c for c, _ in j.pairs]
        rejected += [offset + r for _, r in j.pairs]
        ref += j.ref_logps if j.ref_logps is not None else [0.0] * len(j.answers)
        given = j.labels if j.labels is not None else [None] * len(j.answers)
        labels += [-1 if label is None else int(label) for label in given]
        kl += [k >= len(j.answers) - j.kl_answers for k in range(len(j.answers))]
        offset += len(j.answers)
    return Batch(input_ids, attention_mask, position_ids, response_at, answer_tokens, answer_of, len(answers),
                 torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long), torch.tensor(ref),
                 token_weights, torch.tensor(labels, dtype=torch.long), torch.tensor(kl, dtype=torch.bool),
                 sum(j.terms for j in items))  # fmt: skip


# --- the forward and the loss --------------------------------------------------------------------------------


def answer_logps(policy: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(sum, mean) over its tokens of each answer's log-prob under `policy` (an Actor), (S,) each."""
    logits = policy(batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_at)  # (N, V)
    logps = logprobs_from_logits(logits, batch.tokens)  # (N,) only at the answer tokens
    total = logps.new_zeros(batch.n_answers).index_add(0, batch.answer_of, logps)  # (S,)
    count = torch.bincount(batch.answer_of, minlength=batch.n_answers).clamp(min=1)  # (S,)
    return total, total / count


def pair_loss(cfg: DPOConfig, total: Tensor, mean: Tensor, batch: Batch) -> tuple[Tensor, Stats]:
    """The configured loss over the micro-batch's pairs (mean over pairs) and its implicit-reward stats."""
    c, r = batch.chosen.to(total.device), batch.rejected.to(total.device)
    if cfg.loss == "simpo":
        return simpo_loss(mean[c], mean[r], cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
    if cfg.loss == "orpo":
        return orpo_loss(mean[c], mean[r], cfg.beta)
    if cfg.loss == "kto":
        labels, kl, ref = (
            batch.labels.to(total.device),
            batch.kl_answers.to(total.device),
            batch.ref_logps.to(total),
        )
        judged = labels >= 0
        return kto_loss(total[judged], ref[judged], labels[judged] == 1, total[kl], ref[kl], cfg.beta,
                        cfg.kto_desirable_weight, cfg.kto_undesirable_weight)  # fmt: skip
    ref = batch.ref_logps.to(total.device)
    return dpo_loss(total[c], total[r], ref[c], ref[r], cfg.beta, cfg.loss, cfg.label_smoothing)


@torch.no_grad()
def cache_reference(
    items: list[Judgement], reference: Actor, cfg: DPOConfig, collate_fn: CollateFn,
    ctx: Callable[[], Any], adapter_off: bool,
) -> list[list[float]]:  # fmt: skip
    """The reference's log-prob of every answer, computed once; with `adapter_off`, the LoRA policy's base."""
    out: list[list[float]] = []
    for i in range(0, len(items), cfg.micro_batch_size):
        chunk = items[i : i + cfg.micro_batch_size]
        off = reference.model.disable_adapter() if adapter_off else nullcontext()
        with ctx(), off:
            total = answer_logps(reference, collate_fn(chunk))[0].float().tolist()
        for j in chunk:
            out.append(total[: len(j.answers)])
            total = total[len(j.answers) :]
    return out


@torch.no_grad()
def evaluate(
    policy: Actor, items: list[Judgement], cfg: DPOConfig, collate_fn: CollateFn,
    ctx: Callable[[], Any], reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> dict[str, float]:  # fmt: skip
    """Held-out loss and reward accuracy, each a mean over pairs (with KTO, judged answers), and the implicit
    rewards' margin (reward_means); `reduce` sums each process's sums and counts, so that the means are over
    every process's pairs."""
    sums = dict.fromkeys(["loss", "accuracy", "terms", *REWARDS, *REWARD_COUNTS], 0.0)
    for i in range(0, len(items), cfg.micro_batch_size):
        batch = collate_fn(items[i : i + cfg.micro_batch_size])
        with ctx():
            loss, stats = pair_loss(cfg, *answer_logps(policy, batch), batch)
        q = batch.n_terms
        sums["loss"] += float(loss) * q
        sums["accuracy"] += float(stats["dpo/accuracy"]) * q
        sums["terms"] += q
        add_reward_sums(sums, stats, batch)
    totals = dict(
        zip(sums, reduce(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist(), strict=True)
    )
    n = max(1.0, totals["terms"])
    return {"dpo/eval_loss": totals["loss"] / n, "dpo/eval_accuracy": totals["accuracy"] / n,
            "dpo/eval_margin": reward_means(totals)["dpo/margin"]}  # fmt: skip


def add_reward_sums(sums: dict[str, float], stats: Stats, batch: Batch) -> None:
    """Adds the micro-batch's implicit rewards to `sums` as sums over their answers, with the answers' counts,
    for reward_means."""
    for key, n_key, count in zip(REWARDS, REWARD_COUNTS, batch.reward_counts(), strict=True):
        sums[key] = sums.get(key, 0.0) + float(stats[key]) * count
        sums[n_key] = sums.get(n_key, 0.0) + count


def reward_means(sums: dict[str, float]) -> dict[str, float]:
    """The implicit rewards' means over their own answers, from add_reward_sums's, and the margin as their
    difference. Not a mean of micro-batch means: a KTO micro-batch may hold no desirable (or no undesirable)
    answer, whose mean of none its stats give as 0."""
    chosen, rejected = (
        sums[key] / max(1.0, sums[n_key]) for key, n_key in zip(REWARDS, REWARD_COUNTS, strict=True)
    )
    return {"dpo/chosen_reward": chosen, "dpo/rejected_reward": rejected, "dpo/margin": chosen - rejected}


# --- the model ----------------------------------------------------------------------------------------------


def reference_key(reference: str, items: list[Judgement]) -> str:
    """What reference log-probs are computed from: the reference and every judgement's tokens, in order."""
    digest = hashlib.sha256(reference.encode())
    for j in items:
        digest.update(repr((j.prompt_ids, j.answers)).encode())
    return digest.hexdigest()


def load_reference_cache(path: Path, key: str) -> list[list[float]] | None:
    """The cached reference log-probs if they were computed for `key` (reference_key), else None: a resume with
    another split (seed, eval_fraction), data, max_seq_len or reference computes them again."""
    if not path.exists():
        return None
    cached = torch.load(path, weights_only=True)
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    return cast(list[list[float]], cached["logps"])


# --- the stage ----------------------------------------------------------------------------------------------


def run(cfg: DPOConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    accelerator = make_accelerator(cfg.precision, cfg.log_with, cfg.out_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    seed_everything(cfg.seed + rank)
    tokenizer = load_tokenizer(cfg.policy, cfg.add_pad_token)
    pad_id = int(tokenizer.pad_token_id)
    # Read everything before any output: a malformed row fails with file:line and leaves nothing behind.
    model_config = AutoConfig.from_pretrained(cfg.policy)  # the tokenizer loaded, so the directory exists
    max_len = min(cfg.max_seq_len, context_length(cast(Any, SimpleNamespace(config=model_config))))
    items, truncated = read_judgements(cfg.train_file, cfg, tokenizer, max_len)
    if cfg.eval_file:
        train, held_out = items, read_judgements(cfg.eval_file, cfg, tokenizer, max_len)[0]
    else:
        train, held_out = split_by_prompt(items, cfg.eval_fraction, cfg.seed)
    if not train:
        raise DataError(f"{cfg.train_file}: no comparisons to train on (all ties or empty)")
    if truncated:
        log.warning("dpo: %d answers did not fit in %d tokens with their prompt: the prompt keeps its end, then "
                    "the answer is cut", truncated, max_len)  # fmt: skip
    if cfg.loss == "kto":  # each answer's KL term reads another judgement's answer under its prompt
        add_kl_answers(train, max_len)
        add_kl_answers(held_out, max_len)
    n_pairs = sum(j.terms for j in train)
    log.info("dpo: %d judgements (%d %s) to train on, %d held out", len(train), n_pairs,
             "judged answers" if cfg.loss == "kto" else "pairs", len(held_out))  # fmt: skip

    run_dir = Run(
        cfg.out_dir, cfg, accelerator.is_main_process, accelerator, resume=resume, records=(REFERENCE_CACHE,)
    )
    checkpoint = run_dir.latest_checkpoint() if resume else None
    policy_model = trainable_causal_lm(cfg.policy, checkpoint and checkpoint / "policy", cfg.lora, tokenizer)
    lora = isinstance(policy_model, PeftModel)
    plan = BatchPlan(len(train), cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.seed, world, rank,
                     cfg.max_steps, name="dpo.batch_size", source=cfg.train_file)  # fmt: skip
    policy = Actor(policy_model, lean_forward(policy_model, accelerator, cfg))
    policy.train()  # dropout is off, so train() and eval() compute the same function
    is_main = accelerator.is_main_process
    policy, actor, optimizer, scheduler, start, is_sharded = set_up_training(
        policy, cfg, accelerator, run_dir, checkpoint, plan.total_steps
    )
    ctx = lambda: autocast(accelerator)  # noqa: E731  bf16 for the forward passes outside the prepared module
    device = accelerator.device
    half = trains_in_half(accelerator)
    pack, additive = takes_4d_mask(policy_model)
    hidden_size = getattr(policy_model.config, "hidden_size", None)
    # a judgement's prompt forwarded once, its answers as branches, where the attention takes a 4-D mask
    shared = cfg.pack_sequences and pack and within_window(sliding_window(policy_model), max_len)
    collate_fn: CollateFn = lambda items: collate(items, pad_id, shared, additive, hidden_size).to(device)  # noqa: E731

    # the reference's log-probs: once per run (read back on resume), then the reference is not needed again
    reference_s = 0.0
    if cfg.loss not in REFERENCE_FREE:
        cache_path = run_dir.dir / REFERENCE_CACHE
        everything = train + held_out
        key = reference_key(cfg.reference or cfg.policy, everything)
        cached = load_reference_cache(cache_path, key)
        if cached is None:
            if lora and cfg.reference in (None, cfg.policy):
                reference, adapter_off = actor, True  # the LoRA policy with its adapter off: no second copy
            else:
                ref_path = cfg.reference or cfg.policy
                ref_model = load_causal_lm(ref_path, tokenizer=tokenizer).eval().requires_grad_(False)
                check_same_tokenizer(
                    tokenizer, load_tokenizer(ref_path, cfg.add_pad_token), "dpo.policy", "dpo.reference"
                )
                disable_dropout(ref_model)
                reference = Actor(
                    ref_model.to(accelerator.device), not is_sharded and lean_llama.supports(ref_model)
                )
                if is_sharded:
                    sharding.shard(reference, cfg, accelerator)
                adapter_off = False
            t0 = time.perf_counter()  # the time training waits for: the training set's answers
            cached = cache_reference(train, reference, cfg, collate_fn, ctx, adapter_off)
            reference_s = time.perf_counter() - t0
            cached += cache_reference(held_out, reference, cfg, collate_fn, ctx, adapter_off)
            del reference
            if accelerator.is_main_process:
                tmp = cache_path.with_suffix(".tmp")
                torch.save({"key": key, "logps": cached}, tmp)
                tmp.replace(cache_path)  # atomic: a killed run leaves the old file or none
            log.info(
                "dpo: reference log-probs of %d answers cached (training set in %.1fs)",
                sum(map(len, cached)),
                reference_s,
            )
        for j, logps in zip(everything, cached, strict=True):
            j.ref_logps = logps

    def save_files(path: Path, whole: dict[str, Tensor] | None) -> None:  # the main process only
        save_model_files(actor.model, path / "policy", whole)  # full model, or the adapter
        tokenizer.save_pretrained(path / "policy")

    # sharded, every process must run as many forwards as the others: each evaluates every held-out judgement
    # (as the reward stage does; `evaluate`'s sums over processes then count each world times, its means once)
    held_here = held_out if is_sharded else held_out[rank::world]

    reduce_sum = lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu()  # noqa: E731
    progress = Progress(plan.total_steps, "dpo", accelerator.is_main_process, quiet, initial=start)
    # resumed: the metrics of the checkpoint's step, reported as they were when no step is left to train
    metrics: dict[str, Any] = metrics_at(run_dir.metrics_path, start) if is_main else {}
    pairs_seen, t0 = 0, time.perf_counter()
    for step in range(start, plan.total_steps):
        micro = [[train[i] for i in mb] for mb in plan.micro_batches(step)]
        step_pairs = sum(train[i].terms for i in plan.global_batch(step))  # every process's
        sums: dict[str, float] = {}
        tokens = 0
        for k, chunk in enumerate(micro):
            batch = collate_fn(chunk)
            tokens += int(batch.tokens.numel())
            sync = no_sync(accelerator, policy, sync=k == len(micro) - 1)
            with sync, short_attention(batch.input_ids.size(1), device, half):
                # 1. forward: every answer's summed (and mean) log-prob
                total, mean = answer_logps(policy, batch)  # (S,) each
                # 2. loss: this micro-batch's pairs weigh their share of the global batch's pairs (a ranking
                # holds more than a vote); DDP and FSDP average gradients over processes, so scale back by world
                loss, stats = pair_loss(cfg, total, mean, batch)
                # a mixture of experts' load-balancing loss, where its config sets `output_router_logits`
                if actor.aux_coef is not None:
                    aux = actor.aux_loss(batch.token_weights)
                    loss = loss + actor.aux_coef * aux
                    stats["dpo/aux_loss"] = aux.detach()
                share = batch.n_terms / step_pairs
                accelerator.backward(loss * share * world)
            for key, value in {"dpo/loss": loss.detach(), **stats}.items():
                if key not in (*REWARDS, "dpo/margin"):
                    sums[key] = sums.get(key, 0.0) + float(value) * share
            add_reward_sums(sums, stats, batch)
        # 3. clip and step
        grad_norm = finite_grad_norm(
            accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm), f"dpo: step {step + 1}"
        )
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the step's own, before the schedule moves on
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # 4. log: means over the global batch's pairs (each process holds its share of the sum)
        done = step + 1
        pairs_seen += step_pairs
        rate = pairs_seen / max(1e-9, time.perf_counter() - t0)
        reduced = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "sum")
        totals = dict(zip(sums, reduced.tolist(), strict=True))
        step_metrics = {k: v for k, v in totals.items() if k not in REWARD_COUNTS} | reward_means(totals)
        progress.update(done, tokens * world, loss=step_metrics["dpo/loss"])
        if done % cfg.log_every == 0 or done == plan.total_steps:
            metrics = {**step_metrics, "dpo/grad_norm": float(grad_norm),
                       "dpo/lr": lr, "dpo/pairs_per_s": rate}  # fmt: skip
            run_dir.log(done, metrics)
            progress.line(done, loss=step_metrics["dpo/loss"], accuracy=step_metrics["dpo/accuracy"])
        # 5. evaluate on the held-out prompts
        if held_out and (done % cfg.eval_every == 0 or done == plan.total_steps):
            ev = evaluate(actor, held_here, cfg, collate_fn, ctx, reduce_sum)
            run_dir.log(done, ev)
            progress.line(done, **{k.removeprefix("dpo/"): v for k, v in ev.items()})
            metrics.update(ev)
        # 6. checkpoint (atomic: temp dir, then rename)
        if done % cfg.save_every == 0 or done == plan.total_steps:
            sharding.save_checkpoint(run_dir, done, actor, optimizer, scheduler, cfg, accelerator, is_sharded,
                                     save_files)  # fmt: skip
    progress.close()

    accelerator.wait_for_everyone()
    result: dict[str, Any] = {"steps": plan.total_steps, "train_judgements": len(train), "train_pairs": n_pairs,
                              "held_out_pairs": sum(j.terms for j in held_out), "reference_s": reference_s,
                              **metrics}  # fmt: skip
    final_model = sharding.whole_model(
        actor.model, is_sharded, is_main, lambda: trainable_causal_lm(cfg.policy, None, cfg.lora, tokenizer)
    )
    if is_main:
        save_policy(run_dir.dir / "final", final_model, tokenizer)
        write_json(
            run_dir.dir / "summary.json", {"stage": "dpo", "loss": cfg.loss, "policy": cfg.policy, **result}
        )
    accelerator.wait_for_everyone()
    run_dir.finish()
    return result
