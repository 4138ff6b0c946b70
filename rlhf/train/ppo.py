"""`rlhf ppo`: PPO against a frozen reward model, with a per-token KL penalty to a frozen reference.

One iteration: sample responses to a batch of prompts, score them once (old log-probs, reference log-probs,
values, reward-model score), turn score and KL into per-token rewards, GAE, then a few PPO epochs over
minibatches; every `guard_every` iterations the reward-hacking guard checks KL, proxy and gold on held-out
prompts. The recipe follows Ziegler et al. 2019 / Stiennon et al. 2020 (summarize-from-feedback) and
InstructGPT; the details (dropout off, log-probs at the sampling temperature, score on the EOS token, a fixed
score for answers without EOS, whitened advantages, critic initialised from the reward model) are the ones
"The N Implementation Details of RLHF with PPO" (Huang et al. 2024) found to matter.

Models: the policy (full or LoRA), the reference (the initial policy; with LoRA the same module with its
adapter disabled, so no second copy), the critic (initialised from the reward model, full or LoRA) and the
reward model (frozen). Policy and critic have separate AdamW optimisers: they are separate networks whose good
learning rates differ, and clipping their gradients separately keeps the critic's large early gradients from
shrinking the policy's steps (a joint clip would).

Critic-free variants (`advantage_estimator`): the same loop without a critic, sampling k answers per prompt and
taking the baseline from the other answers: RLOO (leave-one-out), GRPO (group mean, optionally / std: Dr. GRPO
without), REINFORCE++ (per-token returns whitened over the batch). With them, KL can also be a loss term (k2/k3)
rather than a penalty in the reward, and DAPO's clip-higher and token-level loss are options of the policy loss.

Training code never sees the demo's gold judge: the guard's gold score, if any, comes in as `gold_fn`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import PPOConfig
from rlhf.data.jsonl import write_json
from rlhf.data.prompts import read_prompt_rows
from rlhf.errors import ConfigError, DataError
from rlhf.generation import Generation, SamplingParams, decode_responses, generate
from rlhf.losses import ppo_policy_loss, sft_loss, value_loss
from rlhf.models import lean_llama
from rlhf.models.heads import backbone, head_scores, load_reward_model, load_scalar_model, normalisation
from rlhf.models.loading import (
    check_same_tokenizer,
    context_length,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
)
from rlhf.models.lora import add_lora
from rlhf.models.packing import TokenLayout, layout, takes_4d_mask
from rlhf.models.tokens import encode_prompts, stop_ids
from rlhf.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    aggregate_tokens,
    approx_kl,
    compute_gae,
    entropy_from_logits,
    grpo_advantages,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    shape_rewards,
)
from rlhf.runs import Run, seed_everything, set_rng_state
from rlhf.sampling import stream_keys
from rlhf.train import sharding
from rlhf.train.common import (
    Actor,
    BatchPlan,
    ModelForward,
    Progress,
    autocast,
    lean_forward,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    policy_forward,
    save_policy,
    short_attention,
    trains_in_half,
)
from rlhf.train.lm_loop import collate
from rlhf.train.sft import read_demonstrations, tokenize_demonstrations

log = logging.getLogger(__name__)

# gold_fn(prompts, responses, ended) -> one gold utility per response; made by rlhf.eval, never imported here
GoldFn = Callable[[list[str], list[str], list[bool]], list[float]]
# (ids, mask, n_prompt) of prompt + response sequences -> their layout for a forward pass (packed or padded)
LayoutFn = Callable[[Tensor, Tensor, int], TokenLayout]


def read_prompts(path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> list[str]:
    """The prompts of a {prompt} or {messages} source (rlhf.data.prompts); messages through the chat template."""
    return [prompt for _, prompt in read_prompt_rows(path, tokenizer=tokenizer)]


class Critic(ModelForward):
    """The value function V(s_t) at every token, in the reward model's normalised units. Its own forward: the
    sequence-classification forward of Hugging Face would pool to the last token only."""

    def __init__(self, model: PreTrainedModel | PeftModel, lean: bool = False) -> None:
        super().__init__(model, lean)
        self.shift, self.scale = normalisation(self.base)

    @property
    def base(self) -> PreTrainedModel:
        """The Hugging Face model (LoRA layers, if any, are injected into it in place)."""
        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        return cast(PreTrainedModel, model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        hidden = backbone_states(self.base, self.lean, input_ids, attention_mask, position_ids)  # (R, W, H)
        # the scalar head: a Linear, or PEFT's wrapper that keeps it fully trainable under LoRA
        head: Any = getattr(self.base, "score", None) or self.base.classifier
        return (head(hidden).squeeze(-1).float() - self.shift) / self.scale  # (R, W)


def backbone_states(model: PreTrainedModel, lean: bool, *inputs: Tensor) -> Tensor:
    """Final hidden states (R, W, H) of (input_ids, attention_mask, position_ids): lean or Hugging Face's."""
    if lean:
        return lean_llama.hidden_states(model, *inputs)
    input_ids, attention_mask, position_ids = inputs
    return backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state


def response_values(critic: torch.nn.Module, lay: TokenLayout) -> Tensor:
    """V before each response token, (B, T) (0 at padding): the critic read at the token that precedes it."""
    return lay.padded(lay.response(critic(**lay.inputs)))


def reward_scores(reward_model: PreTrainedModel, lay: TokenLayout, lean: bool | None = None) -> Tensor:
    """The reward model's normalised score of each sequence, (B,), read at its last token (EOS). `lean`: through
    rlhf.models.lean_llama (default: wherever it supports the model; never for a sharded one)."""
    lean = lean_llama.supports(reward_model) if lean is None else lean
    hidden = backbone_states(
        reward_model, lean, lay.input_ids, lay.attention_mask, lay.position_ids
    )  # (R, W, H)
    return head_scores(reward_model, lay.last(hidden))


class RewardScores(ModelForward):
    """`reward_scores` as a module, so that a sharded reward model gathers its weights around this forward."""

    def forward(self, lay: TokenLayout) -> Tensor:
        return reward_scores(self.model, lay, self.lean)


@dataclass
class Rollout:
    """One iteration's experience: this process's rows, or the whole batch's once gathered. P = prompt width,
    T = response width."""

    ids: Tensor  # (B, P + T) left-padded prompt, then right-padded response
    mask: Tensor  # (B, P + T)
    n_prompt: int
    response_ids: Tensor  # (B, T)
    response_mask: Tensor  # (B, T) 1 on real response tokens (EOS included)
    logprobs: Tensor  # (B, T) of the policy that sampled (the "old" log-probs)
    ref_logprobs: Tensor  # (B, T)
    values: Tensor  # (B, T)
    scores: Tensor  # (B,) reward-model score, or the no-EOS penalty
    entropy: Tensor  # (B, T) of the sampling distribution


@torch.no_grad()
def score_rollout(
    gen: Generation, policy: Actor, reference: Actor | None, critic: torch.nn.Module | None,
    reward_model: RewardScores, cfg: PPOConfig, ctx: Callable[[], Any], layout_of: LayoutFn,
) -> Rollout:  # fmt: skip
    """Old log-probs, reference log-probs, values and scores, each one batched forward pass per micro-batch.

    The old log-probs come from a forward pass laid out as the update's (`layout_of`), not from generation:
    the KV-cache path rounds differently under bf16, and the first PPO step should see a ratio of 1 (packed
    rows hold other neighbours in the update, which moves it by rounding only; tests/unit/test_packing.py).
    """
    ids = torch.cat([gen.prompt_ids, gen.response_ids], dim=1)  # (B, P + T)
    mask = torch.cat([gen.prompt_mask, gen.response_mask], dim=1)  # (B, P + T)
    n_prompt, rmask = gen.prompt_ids.size(1), gen.response_mask
    parts: dict[str, list[Tensor]] = {k: [] for k in ("logprobs", "ref", "values", "rm", "entropy")}

    def widen(x: Tensor) -> Tensor:
        """(b, t) -> (b, T), 0 at padding."""
        return F.pad(x, (0, rmask.size(1) - x.size(1)))

    for i in range(0, ids.size(0), cfg.micro_batch_size):
        rows = slice(i, i + cfg.micro_batch_size)
        t = int(rmask[rows].sum(1).max())  # longest response in this micro-batch: later columns are padding
        lay = layout_of(ids[rows, : n_prompt + t], mask[rows, : n_prompt + t], n_prompt)
        tokens = gen.response_ids[rows, :t][lay.response_mask]  # (n,) the real response tokens
        with ctx():
            logits = policy_forward(policy, lay)  # (n, V)
            parts["logprobs"].append(widen(lay.padded(logprobs_from_logits(logits, tokens, cfg.temperature))))
            parts["entropy"].append(widen(lay.padded(entropy_from_logits(logits, cfg.temperature))))
            if reference is None:  # LoRA: the reference is the policy with its adapter switched off
                with policy.model.disable_adapter():  # type: ignore[operator]
                    ref_logits = policy_forward(policy, lay)
            else:
                ref_logits = policy_forward(reference, lay)
            parts["ref"].append(widen(lay.padded(logprobs_from_logits(ref_logits, tokens, cfg.temperature))))
            if critic is not None:  # critic-free: no values (zeros)
                parts["values"].append(widen(response_values(critic, lay)))
            else:
                parts["values"].append(torch.zeros_like(parts["ref"][-1]))
            parts["rm"].append(reward_model(lay))  # read at the last token (EOS)
    out = {k: torch.cat(v) for k, v in parts.items()}  # (B, T) each, 0 at padding; rm (B,)
    # the "EOS trick": an answer that never ends gets a fixed low score whatever the reward model says
    penalty = out["rm"] if cfg.no_eos_penalty is None else torch.full_like(out["rm"], cfg.no_eos_penalty)
    scores = torch.where(gen.ended, out["rm"], penalty)  # (B,)
    return Rollout(ids, mask, n_prompt, gen.response_ids, rmask, out["logprobs"], out["ref"], out["values"], scores,
                   out["entropy"])  # fmt: skip


def gather_rollout(r: Rollout, ended: Tensor, accelerator: Any, pad_id: int) -> tuple[Rollout, Tensor]:
    """The whole batch's rollout (and `ended`) on every process, rows in the order of the global batch (each
    process holds a contiguous share of it): advantages, whitening and minibatches are then those of one
    process with the same batch. Prompts are left-padded and responses right-padded to the widest."""
    if accelerator.num_processes == 1:
        return r, ended

    def whole(x: Tensor, pad: float = 0, left: bool = False) -> Tensor:
        return accelerator.gather(accelerator.pad_across_processes(x, dim=1, pad_index=pad, pad_first=left))

    prompt_ids, prompt_mask = (
        whole(r.ids[:, : r.n_prompt], pad_id, True),
        whole(r.mask[:, : r.n_prompt], 0, True),
    )
    response_ids, response_mask = whole(r.response_ids, pad_id), whole(r.response_mask)
    ids, mask = torch.cat([prompt_ids, response_ids], dim=1), torch.cat([prompt_mask, response_mask], dim=1)
    out = Rollout(ids, mask, prompt_ids.size(1), response_ids, response_mask, whole(r.logprobs),
                  whole(r.ref_logprobs), whole(r.values), accelerator.gather(r.scores), whole(r.entropy))  # fmt: skip
    return out, accelerator.gather(ended.long()).bool()


@dataclass
class Guard:
    """The reward-hacking guard's memory (saved in checkpoints): the last evaluation, the streak, the best."""

    last_proxy: float | None = None
    last_gold: float | None = None
    streak: int = 0
    best_score: float = -math.inf
    best_iteration: int = -1
    stop_reason: str | None = None

    def observe(self, iteration: int, m: dict[str, float], patience: int, kl_budget: float | None) -> bool:
        """Record one evaluation; returns True when it is the best so far (by gold if known, else proxy)."""
        proxy, gold = m["ppo/guard_proxy"], m.get("ppo/guard_gold")
        if gold is not None and self.last_proxy is not None and self.last_gold is not None:
            hacking = proxy > self.last_proxy and gold < self.last_gold
            self.streak = self.streak + 1 if hacking else 0
        self.last_proxy, self.last_gold = proxy, gold
        if self.streak >= patience:
            self.stop_reason = (
                f"reward hacking: proxy rose while gold fell in {self.streak} evaluations in a row"
            )
        if kl_budget is not None and m["ppo/guard_kl"] > kl_budget:
            self.stop_reason = f"KL budget: {m['ppo/guard_kl']:.3g} nats > kl_budget {kl_budget:.3g}"
            return False  # a policy outside the budget is never kept as the best
        score = proxy if gold is None else gold
        if score > self.best_score:
            self.best_score, self.best_iteration = score, iteration
            return True
        return False


_GUARD_STREAM = -1  # in the place of the iteration in the held-out samples' stream keys


@torch.no_grad()
def guard_eval(
    policy: Actor, reference: Actor | None, critic: torch.nn.Module | None,
    reward_model: RewardScores, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
    cfg: PPOConfig, ctx: Callable[[], Any], layout_of: LayoutFn, gold_fn: GoldFn | None,
    reduce: Callable[[Tensor], Tensor], synced: bool = False, index: Tensor | None = None,
) -> dict[str, float]:  # fmt: skip
    """Held-out KL to the reference (nats per answer), proxy score and gold score, sampled with a fixed seed.
    `index`: each prompt's place among all processes' held-out prompts, which names its random stream."""
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    ids = encode_prompts(tokenizer, prompts)
    # streams of their own, the same at every evaluation: successive evaluations differ only by the policy
    seeds = stream_keys(cfg.seed, _GUARD_STREAM, torch.arange(len(ids)) if index is None else index)
    with ctx():
        gen = generate(
            policy.model, ids, params, stop_ids(tokenizer), tokenizer.pad_token_id, synced=synced, seeds=seeds
        )
    r = score_rollout(gen, policy, reference, critic, reward_model, cfg, ctx, layout_of)
    kl = masked_sum(
        approx_kl(r.logprobs, r.ref_logprobs, r.response_mask, cfg.kl_estimator), r.response_mask, dim=1
    )
    stats = [kl.mean(), r.scores.mean()]
    if gold_fn is not None:
        gold = gold_fn(prompts, decode_responses(tokenizer, gen), gen.ended.tolist())
        stats.append(torch.tensor(gold, dtype=torch.float32).mean())
    values = reduce(torch.stack(stats)).tolist()
    return dict(zip(["ppo/guard_kl", "ppo/guard_proxy", "ppo/guard_gold"], values, strict=False))


def load_models(
    cfg: PPOConfig, checkpoint: Path | None, tokenizer: PreTrainedTokenizerBase
) -> tuple[Any, PreTrainedModel | None, Critic | None, PreTrainedModel]:
    """Policy, reference (None: the policy with its LoRA adapter off), critic (None for the critic-free
    estimators) and reward model; dropout off."""
    lora = cfg.lora_r > 0
    policy: Any = load_causal_lm(
        str(checkpoint / "policy") if checkpoint and not lora else cfg.policy, tokenizer=tokenizer
    )
    critic_model: Any = None
    if cfg.advantage_estimator == "gae":
        critic_model = load_scalar_model(
            str(checkpoint / "critic") if checkpoint and not lora else cfg.critic or cfg.reward_model
        )
    if lora and checkpoint:
        policy = PeftModel.from_pretrained(policy, checkpoint / "policy", is_trainable=True)
        if critic_model is not None:
            critic_model = PeftModel.from_pretrained(critic_model, checkpoint / "critic", is_trainable=True)
    elif lora:
        policy = add_lora(policy, cfg.lora_r, cfg.lora_alpha, "CAUSAL_LM")
        critic_model = critic_model and add_lora(critic_model, cfg.lora_r, cfg.lora_alpha, "SEQ_CLS")
    reference = None
    if not lora or cfg.reference not in (None, cfg.policy):
        reference = (
            load_causal_lm(cfg.reference or cfg.policy, tokenizer=tokenizer).eval().requires_grad_(False)
        )
    reward_model = load_reward_model(cfg.reward_model).eval().requires_grad_(False)
    for model in (policy, reference, critic_model, reward_model):
        if model is not None:
            disable_dropout(model)
    return policy, reference, None if critic_model is None else Critic(critic_model), reward_model


def no_sync(accelerator: Any, *models: torch.nn.Module, sync: bool) -> ExitStack:
    """Skip DDP's gradient all-reduce for these models unless `sync` (gradient accumulation)."""
    stack = ExitStack()
    if not sync:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def rollout_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, cfg: PPOConfig
) -> tuple[Tensor, Tensor]:
    """(advantages, returns), (B, T) each, from the per-token rewards (the score on the last token, the KL
    penalty, if any, on each). gae: GAE on the critic's values, whitened. rloo, grpo: each answer's total reward
    against the other answers to its prompt (k consecutive rows), the same advantage on all its tokens.
    reinforce_pp: reward-to-go whitened over the whole batch. Returns are the critic's targets,
    equal to the advantages where there is no critic."""
    if cfg.advantage_estimator == "gae":
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        return masked_whiten(advantages, mask), returns
    if cfg.advantage_estimator == "reinforce_pp":
        advantages = reinforce_pp_advantages(rewards, mask, cfg.gamma)
    else:
        totals = masked_sum(rewards, mask, dim=1)  # (B,) score - beta * KL of each answer
        k = cfg.samples_per_prompt
        if cfg.advantage_estimator == "rloo":
            per_answer = rloo_advantages(totals, k)
        else:
            per_answer = grpo_advantages(totals, k, cfg.grpo_scale_by_std)  # (B,)
        advantages = per_answer[:, None] * mask  # (B, T)
    return advantages, advantages


def run(
    cfg: PPOConfig, resume: bool = False, quiet: bool = False, gold_fn: GoldFn | None = None
) -> dict[str, Any]:
    accelerator = make_accelerator(cfg.precision, cfg.log_with, cfg.out_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    seed_everything(cfg.seed + rank)
    if cfg.minibatch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"ppo.minibatch_size ({cfg.minibatch_size}) must be divisible by micro_batch_size x "
                          f"processes ({cfg.micro_batch_size} x {world})")  # fmt: skip
    k = cfg.samples_per_prompt  # each process samples whole groups of k answers to a prompt
    if (cfg.batch_size // k) % world:
        raise ConfigError(f"ppo.batch_size / samples_per_prompt ({cfg.batch_size // k} prompts) must be divisible "
                          f"by the {world} processes")  # fmt: skip
    tokenizer = load_tokenizer(cfg.policy, cfg.add_pad_token)
    for role, path in (("ppo.reward_model", cfg.reward_model), ("ppo.critic", cfg.critic)):
        if path:  # the policy's token ids are what the reward model and the critic read
            check_same_tokenizer(tokenizer, load_tokenizer(path, cfg.add_pad_token), "ppo.policy", role)
    # read before any output: bad input leaves nothing behind
    prompts = read_prompts(cfg.prompts_file, tokenizer)
    guard_prompts = (
        read_prompts(cfg.eval_prompts_file, tokenizer)[: cfg.guard_prompts] if cfg.eval_prompts_file else []
    )
    is_sharded, is_main = sharding.sharded(cfg, accelerator), accelerator.is_main_process
    if is_sharded:  # sharded models run their forwards on every process together: as many prompts on each
        guard_prompts = guard_prompts[: len(guard_prompts) // world * world]
    guard_index = torch.arange(len(guard_prompts))[rank::world]  # (n,) this process's share, by global place
    guard_prompts = guard_prompts[rank::world]
    if cfg.ptx_coef > 0 and not cfg.ptx_file:
        raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_file (demonstrations for the SFT loss)")
    demonstrations = read_demonstrations(cfg.ptx_file, tokenizer) if cfg.ptx_coef > 0 and cfg.ptx_file else []
    run_dir = Run(cfg.out_dir, cfg, accelerator.is_main_process, accelerator)
    checkpoint = run_dir.latest_checkpoint() if resume else None
    policy, reference, critic, reward_model = load_models(cfg, checkpoint, tokenizer)
    if cfg.max_new_tokens >= context_length(policy):
        raise ConfigError(f"ppo.max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt")
    prompt_ids = encode_prompts(tokenizer, prompts)
    fitting = [p for p in prompt_ids if len(p) + cfg.max_new_tokens <= context_length(policy)]
    if len(fitting) < len(prompt_ids):  # a cut prompt would train on a question that was never asked
        log.warning("ppo: %d of %d prompts leave no room for max_new_tokens in the context; not used",
                    len(prompt_ids) - len(fitting), len(prompt_ids))  # fmt: skip
    if not fitting:
        raise DataError(
            f"{cfg.prompts_file}: no prompt fits the context with max_new_tokens {cfg.max_new_tokens}"
        )
    prompt_ids = fitting
    ptx = (
        tokenize_demonstrations(demonstrations, tokenizer, context_length(policy))[0]
        if demonstrations
        else []
    )

    # the lean Llama forward wherever a model's weights are whole on this process (not sharded by FSDP/ZeRO)
    policy = Actor(policy, lean_forward(policy, accelerator, cfg))
    if critic is not None:
        critic.lean = lean_forward(critic.base, accelerator, cfg)
    frozen_lean = lambda m: not is_sharded and lean_llama.supports(m)  # noqa: E731
    reference_actor = (
        None if reference is None else Actor(reference.to(accelerator.device), frozen_lean(reference))
    )
    scorer = RewardScores(reward_model.to(accelerator.device), frozen_lean(reward_model))
    if is_sharded:  # before the optimisers: sharding replaces the parameters
        sharding.shard(policy.model, cfg, accelerator)  # the model itself is the root: generation calls it
        for module in (critic, reference_actor, scorer):
            if module is not None:
                sharding.shard(module, cfg, accelerator)

    # optimisers and schedules: one optimiser step per minibatch, per epoch, per iteration
    updates_per_iteration = cfg.epochs * (cfg.batch_size // cfg.minibatch_size)
    policy.train()  # dropout is off everywhere, so train() and eval() compute the same function
    half = trains_in_half(accelerator)  # policy and critic are loaded in fp32: autocast decides
    policy_opt = make_optimizer(policy, cfg)
    policy_sched = make_scheduler(policy_opt, cfg, cfg.iterations * updates_per_iteration)
    critic_opt = critic_sched = None
    if critic is not None:
        critic.train()
        critic_opt = make_optimizer(critic, cfg.model_copy(update={"lr": cfg.critic_lr}))
        critic_sched = make_scheduler(critic_opt, cfg, cfg.iterations * updates_per_iteration)
    kl_ctl: KLController = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )  # fmt: skip
    guard, start = Guard(), 0
    if checkpoint is not None:
        state = Run.load_state(checkpoint)
        sharding.load_optimizer_state(policy, policy_opt, state["policy_optimizer"], is_sharded)
        policy_sched.load_state_dict(state["policy_scheduler"])
        if critic is not None and critic_opt is not None and critic_sched is not None:
            sharding.load_optimizer_state(critic, critic_opt, state["critic_optimizer"], is_sharded)
            critic_sched.load_state_dict(state["critic_scheduler"])
        kl_ctl.load_state_dict(state["kl_ctl"])
        guard = Guard(**state["guard"])
        set_rng_state(state["rng"])
        start = state["step"]
        run_dir.truncate_metrics(start)
        log.info("ppo: resumed from %s (iteration %d)", checkpoint, start)
    policy, policy_opt = sharding.prepare(accelerator, policy, policy_opt, is_sharded)
    critic_module: Critic | None = None
    if critic is not None:
        critic, critic_opt = sharding.prepare(accelerator, critic, critic_opt, is_sharded)
        critic_module = cast(Critic, accelerator.unwrap_model(critic))
    actor = cast(Actor, accelerator.unwrap_model(policy))
    policy_model: Any = actor.model  # the bare model, for generation and saving
    trained: list[tuple[Any, Any, Any, str]] = [(policy, policy_opt, policy_sched, "ppo/grad_norm")]
    if critic is not None:
        trained.append((critic, critic_opt, critic_sched, "ppo/critic_grad_norm"))
    ctx = lambda: autocast(accelerator)  # noqa: E731  bf16 for the forward passes of unprepared modules
    # sequences packed into rows when every model takes a 4-D attention mask (SDPA, eager)
    critic_base = None if critic_module is None else critic_module.base
    masks = [takes_4d_mask(m) for m in (policy_model, critic_base, reward_model, reference) if m is not None]
    pack, additive = cfg.pack_sequences and all(ok for ok, _ in masks), any(add for _, add in masks)
    # rows as wide as suits the policy, which computes the most passes (packing.row_width)
    hidden_size = getattr(policy_model.config, "hidden_size", None)
    layout_of: LayoutFn = lambda ids, mask, n_prompt: layout(  # noqa: E731
        ids, mask, n_prompt, tokenizer.pad_token_id, pack, additive, hidden_size
    )
    device = accelerator.device
    reduce = lambda t: accelerator.reduce(t.to(accelerator.device), reduction="mean")  # noqa: E731

    def whole_policy() -> Any:
        """The policy with all its weights, on the main process (None elsewhere); every process calls it.
        Sharded: a plain copy rebuilt from the configuration, the gathered weights loaded into it."""
        if not is_sharded:
            return policy_model if is_main else None
        state = sharding.full_state_dict(policy_model, is_main)
        if state is None:
            return None
        model = load_causal_lm(cfg.policy, tokenizer=tokenizer)
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, "CAUSAL_LM") if cfg.lora_r > 0 else model
        return sharding.load_whole(model, state)

    def save_checkpoint(iteration: int) -> None:
        accelerator.wait_for_everyone()
        named = cfg.fsdp  # whole optimiser state keyed by name: resumable on another process count
        policy_state = sharding.full_state_dict(policy_model, is_main) if is_sharded else None
        critic_state = None
        if critic_module is not None and is_sharded:
            critic_state = sharding.full_state_dict(critic_module.model, is_main)
        state = {"policy_optimizer": sharding.optimizer_state(actor, policy_opt, named),
                 "policy_scheduler": policy_sched.state_dict(), "kl_ctl": kl_ctl.state_dict(),
                 "guard": asdict(guard)}  # fmt: skip
        if critic_module is not None and critic_opt is not None and critic_sched is not None:
            state |= {
                "critic_optimizer": sharding.optimizer_state(critic_module, critic_opt, named),
                "critic_scheduler": critic_sched.state_dict(),
            }

        def save_files(path: Path) -> None:  # the main process only
            # full model, or the adapter
            policy_model.save_pretrained(
                str(path / "policy"), safe_serialization=True, state_dict=policy_state
            )
            tokenizer.save_pretrained(path / "policy")
            if critic_module is not None:
                critic_module.model.save_pretrained(
                    str(path / "critic"), safe_serialization=True, state_dict=critic_state
                )

        run_dir.save_checkpoint(iteration, save_files, state, keep=cfg.keep_checkpoints)

    def run_guard(iteration: int) -> dict[str, float]:
        m = guard_eval(actor, reference_actor, critic_module, scorer, tokenizer, guard_prompts, cfg, ctx,
                       layout_of, gold_fn, reduce, is_sharded, guard_index)  # fmt: skip
        best = guard.observe(iteration, m, cfg.guard_patience, cfg.kl_budget)  # the same on every process
        whole = whole_policy() if best else None
        if whole is not None:
            save_policy(run_dir.dir / "best", whole, tokenizer)
            write_json(run_dir.dir / "best" / "guard.json", {"iteration": iteration, **m})
        run_dir.log(iteration, m)
        return m

    n_iterations = min(cfg.iterations, cfg.max_steps) if cfg.max_steps else cfg.iterations
    plan = BatchPlan(len(prompt_ids), cfg.batch_size // k, cfg.batch_size // k // world, epochs=cfg.iterations,
                     seed=cfg.seed, world_size=world, rank=rank)  # fmt: skip
    sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    eos_id, pad_id = stop_ids(tokenizer), tokenizer.pad_token_id
    progress = Progress(n_iterations, "ppo", accelerator.is_main_process, quiet, initial=start)
    guard_on = bool(guard_prompts)
    if guard_on and start == 0:
        progress.line(0, **run_guard(0))  # the initial policy is the baseline (and the first "best")
    metrics: dict[str, float] = {}
    done = start
    for iteration in range(start, n_iterations):
        if guard.stop_reason:
            break
        t0 = time.perf_counter()
        # each sample draws from a stream named by (seed, iteration, its place in the global batch), and the
        # minibatch order is one permutation of the global batch: the same samples and updates on any number of
        # processes, and a resumed run draws the same ones
        seed = cfg.seed * 1_000_003 + iteration
        rng = torch.Generator().manual_seed(seed)  # minibatch order
        ptx_rng = torch.Generator().manual_seed(seed * 1024 + rank)  # PPO-ptx picks, each process its own

        # 1. generate (k answers to each prompt, side by side: rows i*k .. i*k + k - 1); this process's rows
        # are a contiguous share of the global batch
        batch_ids = [prompt_ids[i] for i in next(plan.micro_batches(iteration)) for _ in range(k)]
        places = rank * len(batch_ids) + torch.arange(len(batch_ids))  # (b,) each row's place in the batch
        with ctx():
            gen = generate(policy_model, batch_ids, sampling, eos_id, pad_id, synced=is_sharded,
                           seeds=stream_keys(cfg.seed, iteration, places))  # fmt: skip

        # 2. score: old log-probs, reference log-probs, values, reward-model scores; then the whole batch's
        # rollout on every process, so that whitening, advantages and statistics are global
        r = score_rollout(gen, actor, reference_actor, critic_module, scorer, cfg, ctx, layout_of)
        r, ended = gather_rollout(r, gen.ended, accelerator, pad_id)
        rmask = r.response_mask  # (B, T) the global batch

        # 3. rewards with KL penalty: -beta * KL on every token (unless KL is a loss term), the score on the last
        kl = approx_kl(r.logprobs, r.ref_logprobs, rmask, cfg.kl_estimator)  # (B, T)
        rewards = shape_rewards(r.scores, kl, rmask, kl_ctl.value if cfg.kl_in == "reward" else 0.0)  # (B, T)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, rmask, shift_mean=False)

        # 4. advantages: GAE with the critic; or, critic-free, a baseline from the prompt's other answers
        advantages, returns = rollout_advantages(rewards, r.values, rmask, cfg)  # (B, T) each
        t_rollout = time.perf_counter() - t0

        # 5. update: `epochs` passes over shuffled minibatches, gradients accumulated over micro-batches
        stats: dict[str, list[float]] = defaultdict(list)
        share = cfg.minibatch_size // world
        for _epoch in range(cfg.epochs):
            order = torch.randperm(rmask.size(0), generator=rng)
            for whole_minibatch in order.split(cfg.minibatch_size):
                minibatch = whole_minibatch[rank * share : (rank + 1) * share]  # this process's share
                if ptx:  # PPO-ptx (InstructGPT): keep the SFT objective on demonstrations
                    pick = torch.randint(len(ptx), (cfg.ptx_batch_size,), generator=ptx_rng)
                    demos = {
                        k: v.to(device) for k, v in collate([ptx[i] for i in pick.tolist()], pad_id).items()
                    }
                    with accelerator.no_sync(policy):
                        rows, width = demos["input_ids"].shape  # right-padded: positions 0, 1, ...
                        demo_logits = policy(
                            input_ids=demos["input_ids"], attention_mask=demos["attention_mask"],
                            position_ids=torch.arange(width, device=device).expand(rows, width),
                            response_at=torch.arange(rows * width, device=device),
                        ).view(rows, width, -1)  # fmt: skip
                        loss_ptx = sft_loss(demo_logits.float(), demos["labels"])
                        accelerator.backward(cfg.ptx_coef * loss_ptx)
                    stats["ppo/ptx_loss"].append(float(loss_ptx))
                micro = minibatch.split(cfg.micro_batch_size)
                for j, idx in enumerate(micro):
                    t = int(rmask[idx].sum(1).max())  # columns after the longest response are padding
                    lay = layout_of(r.ids[idx, : r.n_prompt + t], r.mask[idx, : r.n_prompt + t], r.n_prompt)
                    m = rmask[idx, :t]
                    old_logprobs, old_values = r.logprobs[idx, :t], r.values[idx, :t]
                    adv, ret = advantages[idx, :t], returns[idx, :t]
                    # gradients are all-reduced once per minibatch, by the backward of its last micro-batch
                    with (
                        no_sync(accelerator, *(m for m, *_ in trained), sync=j == len(micro) - 1),
                        short_attention(lay.input_ids.size(1), device, half),
                    ):
                        logits = policy_forward(policy, lay)  # (n, V) at the real response tokens
                        tokens = r.response_ids[idx, :t][lay.response_mask]  # (n,)
                        logprobs = lay.padded(logprobs_from_logits(logits, tokens, cfg.temperature))  # (b, t)
                        pg_loss, pg_stats = ppo_policy_loss(
                            logprobs, old_logprobs, adv, m, cfg.clip_eps, cfg.clip_eps_high,
                            cfg.loss_aggregation, cfg.max_new_tokens,
                        )  # fmt: skip
                        loss = pg_loss
                        if cfg.kl_in == "loss":  # GRPO: KL to the reference as a loss term (k2 or k3)
                            ref = r.ref_logprobs[idx, :t]
                            kl_now = approx_kl(logprobs, ref, m, cfg.kl_estimator)  # (b, t)
                            kl_loss = aggregate_tokens(kl_now, m, cfg.loss_aggregation, cfg.max_new_tokens)
                            loss = loss + kl_ctl.value * kl_loss
                            pg_stats["ppo/kl_loss"] = kl_loss.detach()
                        if cfg.entropy_coef > 0:
                            entropy = lay.padded(entropy_from_logits(logits, cfg.temperature))  # (b, t)
                            loss = loss - cfg.entropy_coef * masked_mean(entropy, m)
                        accelerator.backward(loss / len(micro))
                        step_stats = {"ppo/policy_loss": pg_loss.detach(), **pg_stats}
                        if critic is not None:
                            values = response_values(critic, lay)  # (b, t)
                            vf_loss, vf_stats = value_loss(values, old_values, ret, m, cfg.value_clip)
                            accelerator.backward(cfg.vf_coef * vf_loss / len(micro))
                            value_error = masked_mean((values.detach() - ret) ** 2, m)
                            step_stats |= {"ppo/value_loss": vf_loss.detach(), "ppo/value_error": value_error,
                                           **vf_stats}  # fmt: skip
                    for key, value in step_stats.items():
                        stats[key].append(float(value))
                for model, opt, sched, norm_key in trained:
                    stats[norm_key].append(
                        float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                    )
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)

        # 6. log: means over this iteration's micro-batches, then over processes; the KL controller adapts
        seq_kl = masked_sum(kl, rmask, dim=1)  # (B,) KL of each answer, nats
        rollout_stats = {
            "ppo/score": r.scores.mean(),
            "ppo/kl": seq_kl.mean(),
            "ppo/reward": (r.scores - kl_ctl.value * seq_kl).mean(),
            "ppo/entropy": masked_mean(r.entropy, rmask),
            "ppo/response_length": rmask.sum(1).float().mean(),
            "ppo/eos_rate": ended.float().mean(),
            "ppo/advantages_mean": masked_mean(advantages, rmask),
            "ppo/returns_mean": masked_mean(returns, rmask),
        }
        local = {
            **{k: float(v) for k, v in rollout_stats.items()},
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        metrics = dict(zip(local, reduce(torch.tensor(list(local.values()))).tolist(), strict=True))
        metrics |= {"ppo/kl_coef": kl_ctl.value, "ppo/lr": float(policy_sched.get_last_lr()[0]),
                    "ppo/rollout_s": t_rollout, "ppo/iteration_s": time.perf_counter() - t0}  # fmt: skip
        kl_ctl.update(metrics["ppo/kl"], cfg.batch_size)
        done = iteration + 1
        progress.update(done, int(rmask.sum()), score=metrics["ppo/score"], kl=metrics["ppo/kl"])
        if done % cfg.log_every == 0 or done == n_iterations:
            run_dir.log(done, metrics)
            progress.line(
                done, **{k.removeprefix("ppo/"): metrics[k] for k in ("ppo/score", "ppo/kl", "ppo/clipfrac")}
            )

        # 7. reward-hacking guard on held-out prompts; 8. checkpoint (atomic)
        if guard_on and (done % cfg.guard_every == 0 or done == n_iterations):
            progress.line(done, **run_guard(done))
        if done % cfg.save_every == 0 or done == n_iterations or guard.stop_reason:
            save_checkpoint(done)
    progress.close()

    accelerator.wait_for_everyone()
    whole = whole_policy()
    if whole is not None:
        save_policy(run_dir.dir / "final", whole, tokenizer)
        summary = {"stage": "ppo", "advantage_estimator": cfg.advantage_estimator, "iterations": done,
                   "stop_reason": guard.stop_reason or "completed", "best_iteration": guard.best_iteration,
                   "best_score": guard.best_score if guard_on else None, "policy": cfg.policy,
                   "reward_model": cfg.reward_model, **metrics}  # fmt: skip
        write_json(run_dir.dir / "summary.json", summary)
    run_dir.finish()
    accelerator.wait_for_everyone()
    return {"stop_reason": guard.stop_reason or "completed", **metrics}
