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
shrinking the policy's steps (a joint clip would). Their loading and the critic's and reward model's forwards
are in rlhf/models/wrappers.py, the guard's memory in rlhf/train/guard.py.

Critic-free variants (`advantage_estimator`): the same loop without a critic, sampling k answers per prompt and
taking the baseline from the other answers: RLOO (leave-one-out), GRPO (group mean, optionally / std: Dr. GRPO
without), REINFORCE++ (per-token returns whitened over the batch). With them, KL can also be a loss term (k2/k3)
rather than a penalty in the reward, and DAPO's clip-higher and token-level loss are options of the policy loss.

`run` is the loop: `set_up` prepares a PPOState, then each iteration is `rollout` (generate, score, rewards,
advantages), `update` (the PPO epochs), the log, and every so often `run_guard` and `save_checkpoint`. Training
code never sees the demo's gold judge: the guard's gold score, if any, comes in as `gold_fn`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from rlhf.config import PPOConfig
from rlhf.data.jsonl import write_json
from rlhf.data.prompts import read_prompts
from rlhf.engine import lean_llama
from rlhf.engine.decoding import Generation, SamplingParams, decode_responses, generate
from rlhf.engine.packing import TokenLayout, layout, sliding_window, takes_4d_mask
from rlhf.engine.sampling import stream_keys
from rlhf.errors import ConfigError, DataError, from_setting
from rlhf.losses import ppo_policy_loss, value_loss
from rlhf.models.loading import (
    check_same_tokenizer,
    context_length,
    load_causal_lm,
    load_tokenizer,
    save_model_files,
)
from rlhf.models.lora import add_lora
from rlhf.models.tokens import encode_prompts, stop_ids
from rlhf.models.wrappers import (
    Actor,
    Critic,
    Scorer,
    frozen_reward_model,
    load_models,
    response_values,
    reward_scorer,
    safety_tagged,
)
from rlhf.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    accumulation_weight,
    aggregate_tokens,
    approx_kl,
    entropy_from_logits,
    estimate_advantages,
    kl_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_whiten,
    shape_rewards,
)
from rlhf.runs import Run, read_metrics, restore_schedule, seed_everything, set_rng_state
from rlhf.train import sharding
from rlhf.train.common import (
    BatchPlan,
    Progress,
    autocast,
    finite_grad_norm,
    lean_forward,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    no_sync,
    policy_forward,
    save_policy,
    short_attention,
    trains_in_half,
)
from rlhf.train.demonstrations import read_demonstrations, tokenize_demonstrations
from rlhf.train.guard import Guard
from rlhf.train.lm_loop import Example, collate, demonstration_loss
from rlhf.train.reward_functions import RewardFunctions, prompt_rows

log = logging.getLogger(__name__)

# gold_fn(prompts, responses, ended) -> one gold utility per response; made by rlhf.eval, never imported here
GoldFn = Callable[[list[str], list[str], list[bool]], list[float]]
# (ids, mask, n_prompt) of prompt + response sequences -> their layout for a forward pass (packed or padded)
LayoutFn = Callable[[Tensor, Tensor, int], TokenLayout]


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
    exact_kl: Tensor | None = None  # (B, T) KL to the reference over the whole vocabulary (the guard's)


def final_scores(rm: Tensor, ended: Tensor, n_tokens: Tensor, cfg: PPOConfig) -> Tensor:
    """Each answer's score (B,): the reward model's, a fixed low one for an answer that never ends (the "EOS
    trick", whatever the reward model says), less `length_penalty` per response token."""
    penalty = rm if cfg.no_eos_penalty is None else torch.full_like(rm, cfg.no_eos_penalty)
    scores = torch.where(ended, rm, penalty)
    return scores - cfg.length_penalty * n_tokens.to(scores.dtype) if cfg.length_penalty else scores


@torch.no_grad()
def score_rollout(
    gen: Generation, policy: Actor, reference: Actor | None, critic: torch.nn.Module | None,
    reward_model: Scorer | None, cfg: PPOConfig, ctx: Callable[[], Any], layout_of: LayoutFn,
    exact_kl: bool = False, tagged: Tensor | None = None, function_scores: Tensor | None = None,
) -> Rollout:  # fmt: skip
    """Old log-probs, reference log-probs, values and scores, each one batched forward pass per micro-batch;
    with `exact_kl`, also each position's KL to the reference over the whole vocabulary; `tagged`: SafetyRouted.
    `function_scores` (B,): the reward functions' part of each score, added to the reward model's (if any).

    The old log-probs come from a forward pass laid out as the update's (`layout_of`), not from generation:
    the KV-cache path rounds differently under bf16, and the first PPO step should see a ratio of 1 (packed
    rows hold other neighbours in the update, which moves it by rounding only; tests/unit/test_packing.py).
    """
    ids = torch.cat([gen.prompt_ids, gen.response_ids], dim=1)  # (B, P + T)
    mask = torch.cat([gen.prompt_mask, gen.response_mask], dim=1)  # (B, P + T)
    n_prompt, rmask = gen.prompt_ids.size(1), gen.response_mask
    parts: dict[str, list[Tensor]] = {k: [] for k in ("logprobs", "ref", "values", "rm", "entropy", "kl")}

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
            ref_logprobs = logprobs_from_logits(ref_logits, tokens, cfg.ref_temperature or cfg.temperature)
            parts["ref"].append(widen(lay.padded(ref_logprobs)))
            if exact_kl:
                parts["kl"].append(widen(lay.padded(kl_from_logits(logits, ref_logits, cfg.temperature))))
            if critic is not None:  # critic-free: no values (zeros)
                parts["values"].append(widen(response_values(critic, lay)))
            else:
                parts["values"].append(torch.zeros_like(parts["ref"][-1]))
            if reward_model is not None:
                rm = reward_model(lay) if tagged is None else reward_model(lay, tagged[rows])  # (b,) at EOS
                parts["rm"].append(rm)
    out = {k: torch.cat(v) for k, v in parts.items() if v}  # (B, T) each, 0 at padding; rm (B,)
    rm = out.get("rm", torch.zeros(ids.size(0), device=rmask.device))  # (B,)
    if function_scores is not None:
        rm = rm + function_scores.to(rm)
    scores = final_scores(rm, gen.ended, rmask.sum(1), cfg)  # (B,)
    return Rollout(ids, mask, n_prompt, gen.response_ids, rmask, out["logprobs"], out["ref"], out["values"], scores,
                   out["entropy"], out.get("kl"))  # fmt: skip


def function_scores(
    functions: RewardFunctions,
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    gen: Generation,
) -> tuple[Tensor | None, dict[str, float]]:
    """The reward functions' part of each answer's score (B,) (None without reward functions), and each
    function's mean value. `rows[i]`: answer i's prompt row."""
    if not functions:
        return None, {}
    stops = set(stop_ids(tokenizer))
    ids = [[t for t, m in zip(row, mask, strict=True) if m and t not in stops]
           for row, mask in zip(gen.response_ids.tolist(), gen.response_mask.tolist(), strict=True)]  # fmt: skip
    totals, means = functions(rows, decode_responses(tokenizer, gen), ids)
    return torch.tensor(totals, dtype=torch.float32, device=gen.response_ids.device), means


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


_GUARD_STREAM = -1  # in the place of the iteration in the held-out samples' stream keys


@torch.no_grad()
def guard_eval(
    policy: Actor, reference: Actor | None, critic: torch.nn.Module | None,
    reward_model: Scorer | None, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
    cfg: PPOConfig, ctx: Callable[[], Any], layout_of: LayoutFn, gold_fn: GoldFn | None,
    reduce: Callable[[Tensor], Tensor], synced: bool = False, index: Tensor | None = None,
    functions: RewardFunctions | None = None, rows: list[dict[str, Any]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Held-out KL to the reference (nats per answer), proxy score and gold score, sampled with a fixed seed.
    `index`: each prompt's place among all processes' held-out prompts, which names its random stream. The
    proxy is the training score: the reward model's plus the reward `functions`' (on the prompts' `rows`)."""
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    ids = encode_prompts(tokenizer, prompts)
    # streams of their own, the same at every evaluation: successive evaluations differ only by the policy
    seeds = stream_keys(cfg.seed, _GUARD_STREAM, torch.arange(len(ids)) if index is None else index)
    with ctx():
        gen = generate(
            policy.model, ids, params, stop_ids(tokenizer), tokenizer.pad_token_id, synced=synced, seeds=seeds
        )
    tagged = safety_tagged(cfg, prompts)  # (n,) bool, or None
    scores = function_scores(functions, rows or [], tokenizer, gen)[0] if functions else None
    r = score_rollout(gen, policy, reference, critic, reward_model, cfg, ctx, layout_of, True, tagged, scores)
    assert r.exact_kl is not None
    # the exact KL at each visited prefix, summed per answer: a sampled token the policy finds far less likely
    # than the reference would add exp(log pi_ref - log pi) to k3 and let one answer of many move the mean
    kl = masked_sum(r.exact_kl, r.response_mask, dim=1)  # (n,)
    # sums and the count, reduced over processes (whose shares may differ by one): means over all prompts
    stats = [kl.sum(), r.scores.sum()]
    if gold_fn is not None:
        gold = gold_fn(prompts, decode_responses(tokenizer, gen), gen.ended.tolist())
        stats.append(torch.tensor(gold, dtype=torch.float32, device=kl.device).sum())
    *sums, count = reduce(torch.stack([*stats, torch.tensor(float(len(prompts)), device=kl.device)])).tolist()
    return dict(
        zip(["ppo/guard_kl", "ppo/guard_proxy", "ppo/guard_gold"], (v / count for v in sums), strict=False)
    )


@dataclass
class PPOState:
    """What `set_up` prepares for the loop. `policy` and `critic` are the modules that train (wrapped for
    DDP/FSDP by `accelerator.prepare`); `actor` and `critic_module` are the same modules unwrapped, for the
    no-grad forwards and for saving."""

    cfg: PPOConfig
    accelerator: Any
    tokenizer: PreTrainedTokenizerBase
    run_dir: Run
    prompt_ids: list[list[int]]  # the training prompts that leave room for max_new_tokens
    prompt_tagged: Tensor | None  # (N,) bool: those the safety reward model scores (None: no such model)
    guard_prompts: list[str]  # this process's share of the held-out prompts
    guard_index: Tensor  # (n,) their places among all processes' held-out prompts
    ptx: list[Example]  # demonstrations for PPO-ptx (none without it)
    policy: Any
    actor: Actor
    reference: Actor | None  # None: the policy with its LoRA adapter off
    critic: Any  # None for the critic-free estimators
    critic_module: Critic | None
    scorer: Scorer | None  # None: reward functions alone score
    reward_functions: RewardFunctions
    prompt_rows: list[
        dict[str, Any]
    ]  # the rows of `prompt_ids`, for the reward functions (empty without them)
    guard_rows: list[dict[str, Any]]  # the rows of `guard_prompts`, likewise
    policy_opt: Any
    policy_sched: Any
    critic_opt: Any
    critic_sched: Any
    kl_ctl: KLController
    guard: Guard
    layout_of: LayoutFn
    is_sharded: bool
    half: bool  # policy and critic train under half-precision autocast
    start: int  # the first iteration: 0, or the resumed checkpoint's
    gold_fn: GoldFn | None

    @property
    def policy_model(self) -> Any:
        """The bare policy model, for generation and saving."""
        return self.actor.model

    @property
    def trained(self) -> list[tuple[Any, Any, Any, str]]:
        """(module, optimiser, scheduler, grad-norm metric) of each trained network."""
        trained = [(self.policy, self.policy_opt, self.policy_sched, "ppo/grad_norm")]
        if self.critic is not None:
            trained.append((self.critic, self.critic_opt, self.critic_sched, "ppo/critic_grad_norm"))
        return trained

    def autocast(self) -> Any:
        """bf16 for the forward passes of unprepared modules."""
        return autocast(self.accelerator)

    def reduce(self, t: Tensor) -> Tensor:
        """The mean over processes."""
        return cast(Tensor, self.accelerator.reduce(t.to(self.accelerator.device), reduction="mean"))


@dataclass
class Batch:
    """One iteration's whole batch, scored, with its per-token KL, advantages and returns, (B, T) each."""

    rollout: Rollout
    ended: Tensor  # (B,) the answer ended with EOS
    kl: Tensor
    advantages: Tensor
    returns: Tensor
    function_means: dict[str, float]  # each reward function's mean value on this process's answers


def set_up(cfg: PPOConfig, resume: bool, gold_fn: GoldFn | None) -> PPOState:
    """Accelerator, tokenizer, prompts, models (sharded if so configured), optimisers and schedules, the KL
    controller and the guard; resumed from the run's latest checkpoint if `resume`."""
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
    with from_setting("ppo.policy"):
        tokenizer = load_tokenizer(cfg.policy, cfg.add_pad_token)
    roles = [("ppo.reward_model", cfg.reward_model), ("ppo.critic", cfg.critic), ("ppo.reference", cfg.reference),
             ("ppo.safety_reward_model", cfg.safety_reward_model),
             *(("ppo.reward_ensemble", path) for path in cfg.reward_ensemble)]  # fmt: skip
    for role, path in roles:
        if path:  # the policy's token ids are what the reward model, the critic and the reference read
            with from_setting(role):
                other = load_tokenizer(path, cfg.add_pad_token)
            check_same_tokenizer(tokenizer, other, "ppo.policy", role)
    # read before any output: bad input leaves nothing behind
    with from_setting("ppo.prompts_file"):
        prompts = read_prompts(cfg.prompts_file, tokenizer=tokenizer)
    with from_setting("ppo.eval_prompts_file"):
        guard_prompts = (
            read_prompts(cfg.eval_prompts_file, cfg.guard_prompts, tokenizer) if cfg.eval_prompts_file else []
        )
    functions = RewardFunctions(cfg.reward_functions, cfg.reward_function_weights)
    rows = prompt_rows(cfg.prompts_file) if functions else []  # those of the prompts that fit are kept below
    guard_rows = (
        prompt_rows(cfg.eval_prompts_file, rows[0].keys())[
            : len(guard_prompts)
        ]  # the training file's columns too
        if functions and cfg.eval_prompts_file
        else []
    )
    is_sharded = sharding.sharded(cfg, accelerator)
    if 0 < len(guard_prompts) < world:  # a process without one would skip the guard the others wait in
        raise ConfigError(f"ppo: {len(guard_prompts)} held-out prompts for the guard ({cfg.eval_prompts_file}) are "
                          f"fewer than the {world} processes that share them")  # fmt: skip
    if is_sharded and len(guard_prompts) % world:
        # as many prompts on each process: sharded models run their forwards on every process together
        kept = len(guard_prompts) // world * world
        if accelerator.is_main_process:
            log.warning("ppo: the guard evaluates %d of its %d held-out prompts, a multiple of the %d processes "
                        "that share a sharded model", kept, len(guard_prompts), world)  # fmt: skip
        guard_prompts, guard_rows = guard_prompts[:kept], guard_rows[:kept]
    guard_index = torch.arange(len(guard_prompts))[rank::world]  # (n,) this process's share, by global place
    guard_prompts, guard_rows = guard_prompts[rank::world], guard_rows[rank::world]
    if cfg.ptx_coef > 0 and not cfg.ptx_file:
        raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_file (demonstrations for the SFT loss)")
    demonstrations = read_demonstrations(cfg.ptx_file, tokenizer) if cfg.ptx_coef > 0 and cfg.ptx_file else []
    run_dir = Run(cfg.out_dir, cfg, accelerator.is_main_process, accelerator, resume=resume)
    checkpoint = run_dir.latest_checkpoint() if resume else None
    policy, reference, critic, reward_model = load_models(cfg, checkpoint, tokenizer)
    if cfg.max_new_tokens >= context_length(policy):
        raise ConfigError(f"ppo.max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt")
    prompt_ids = encode_prompts(tokenizer, prompts)
    keep = [i for i, p in enumerate(prompt_ids) if len(p) + cfg.max_new_tokens <= context_length(policy)]
    fitting = [prompt_ids[i] for i in keep]
    rows = [rows[i] for i in keep] if functions else []
    if len(fitting) < len(prompt_ids):  # a cut prompt would train on a question that was never asked
        log.warning("ppo: %d of %d prompts leave no room for max_new_tokens in the context; not used",
                    len(prompt_ids) - len(fitting), len(prompt_ids))  # fmt: skip
    if not fitting:
        raise DataError(
            f"{cfg.prompts_file}: no prompt fits the context with max_new_tokens {cfg.max_new_tokens}"
        )
    ptx = (
        tokenize_demonstrations(demonstrations, tokenizer, context_length(policy))[0]
        if demonstrations
        else []
    )

    # the lean Llama forward wherever a model's weights are whole on this process (not sharded by FSDP/ZeRO)
    policy = Actor(policy, lean_forward(policy, accelerator, cfg))
    if critic is not None:
        critic.lean = lean_forward(critic.hf_model, accelerator, cfg)
    frozen_lean = lambda m: not is_sharded and lean_llama.supports(m)  # noqa: E731
    reference_actor = (
        None if reference is None else Actor(reference.to(accelerator.device), frozen_lean(reference))
    )
    others = [*cfg.reward_ensemble, *([cfg.safety_reward_model] if cfg.safety_reward_model else [])]
    members = (
        [] if reward_model is None else [reward_model, *(frozen_reward_model(p, tokenizer) for p in others)]
    )
    scorer, scorers = reward_scorer(cfg, members, accelerator.device, frozen_lean)
    prompt_tagged = safety_tagged(cfg, [prompts[i] for i in keep])
    if prompt_tagged is not None:
        log.info("ppo: %d of %d prompts go to ppo.safety_reward_model", int(prompt_tagged.sum()), len(keep))
    if is_sharded:  # before the optimisers: sharding replaces the parameters
        sharding.shard(policy.model, cfg, accelerator)  # the model itself is the root: generation calls it
        for module in (critic, reference_actor, *scorers):
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
        restore_schedule(policy_opt, policy_sched,
                         lambda s: sharding.load_optimizer_state(policy, policy_opt, s, is_sharded),
                         state["policy_optimizer"], state["policy_scheduler"])  # fmt: skip
        if critic is not None and critic_opt is not None and critic_sched is not None:
            restore_schedule(critic_opt, critic_sched,
                             lambda s: sharding.load_optimizer_state(critic, critic_opt, s, is_sharded),
                             state["critic_optimizer"], state["critic_scheduler"])  # fmt: skip
        kl_ctl.load_state_dict(state["kl_ctl"])
        guard = Guard(**state["guard"])
        set_rng_state(state["rng"])
        start = state["step"]
        run_dir.truncate_metrics(start)
        log.info("ppo: resumed from %s (iteration %d)", checkpoint, start)
    prepared_policy, policy_opt = sharding.prepare(accelerator, policy, policy_opt, is_sharded)
    prepared_critic, critic_module = None, None
    if critic is not None:
        prepared_critic, critic_opt = sharding.prepare(accelerator, critic, critic_opt, is_sharded)
        critic_module = cast(Critic, accelerator.unwrap_model(prepared_critic))
    actor = cast(Actor, accelerator.unwrap_model(prepared_policy))
    # sequences packed into rows when every model takes a 4-D attention mask (SDPA, eager)
    critic_base = None if critic_module is None else critic_module.hf_model
    masks = [takes_4d_mask(m) for m in (actor.model, critic_base, *members, reference) if m is not None]
    pack, additive = cfg.pack_sequences and all(ok for ok, _ in masks), any(add for _, add in masks)
    # a batch with a sequence longer than a model's sliding window goes in padded rows, where the model masks
    windows = [
        w for m in (actor.model, critic_base, *members, reference) if (w := sliding_window(m)) is not None
    ]
    window = min(windows, default=None)
    # rows as wide as suits the policy, which computes the most passes (packing.row_width)
    hidden_size = getattr(actor.model.config, "hidden_size", None)
    layout_of: LayoutFn = lambda ids, mask, n_prompt: layout(  # noqa: E731
        ids, mask, n_prompt, tokenizer.pad_token_id, pack, additive, hidden_size, window
    )
    return PPOState(
        cfg, accelerator, tokenizer, run_dir, fitting, prompt_tagged, guard_prompts, guard_index, ptx,
        prepared_policy, actor, reference_actor, prepared_critic, critic_module, scorer, functions, rows,
        guard_rows, policy_opt, policy_sched,
        critic_opt, critic_sched, kl_ctl, guard, layout_of, is_sharded, half, start, gold_fn,
    )  # fmt: skip


def rollout(s: PPOState, prompts: list[int], iteration: int) -> Batch:
    """Steps 1-4 of an iteration on these prompts (indices into `s.prompt_ids`, this process's share): the
    whole batch scored, with KL-shaped rewards turned into advantages and returns."""
    cfg, k, pad_id = s.cfg, s.cfg.samples_per_prompt, s.tokenizer.pad_token_id
    # 1. generate (k answers to each prompt, side by side: rows i*k .. i*k + k - 1); this process's rows
    # are a contiguous share of the global batch
    batch_ids = [s.prompt_ids[i] for i in prompts for _ in range(k)]
    places = s.accelerator.process_index * len(batch_ids) + torch.arange(len(batch_ids))  # (b,) global places
    sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    with s.autocast():
        gen = generate(s.policy_model, batch_ids, sampling, stop_ids(s.tokenizer), pad_id, synced=s.is_sharded,
                       seeds=stream_keys(cfg.seed, iteration, places))  # fmt: skip

    # 2. score: old log-probs, reference log-probs, values, reward-model and reward-function scores; then the
    # whole batch's rollout on every process, so that whitening, advantages and statistics are global
    tagged = None if s.prompt_tagged is None else s.prompt_tagged[prompts].repeat_interleave(k)  # (b,)
    rows = [s.prompt_rows[i] for i in prompts for _ in range(k)] if s.reward_functions else []
    functions, function_means = function_scores(s.reward_functions, rows, s.tokenizer, gen)
    r = score_rollout(gen, s.actor, s.reference, s.critic_module, s.scorer, cfg, s.autocast, s.layout_of,
                      tagged=tagged, function_scores=functions)  # fmt: skip
    r, ended = gather_rollout(r, gen.ended, s.accelerator, pad_id)
    rmask = r.response_mask  # (B, T) the global batch

    # 3. rewards with KL penalty: -beta * KL on every token (unless KL is a loss term), the score on the last
    kl = approx_kl(r.logprobs, r.ref_logprobs, rmask, cfg.kl_estimator)  # (B, T)
    rewards = shape_rewards(r.scores, kl, rmask, s.kl_ctl.value if cfg.kl_in == "reward" else 0.0)  # (B, T)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, rmask, shift_mean=False)

    # 4. advantages: GAE with the critic; or, critic-free, a baseline from the prompt's other answers
    advantages, returns = estimate_advantages(cfg.advantage_estimator, rewards, r.values, rmask, cfg.gamma, cfg.lam,
                                              cfg.samples_per_prompt, cfg.grpo_scale_by_std)  # fmt: skip
    return Batch(r, ended, kl, advantages, returns, function_means)


def update(s: PPOState, b: Batch, rng: torch.Generator, ptx_rng: torch.Generator) -> dict[str, list[float]]:
    """Step 5: `epochs` passes over minibatches of the whole batch shuffled by `rng` (this process takes its
    share of each), gradients accumulated over micro-batches; PPO-ptx demonstrations drawn by `ptx_rng`.
    Returns each statistic's values, one per micro-batch (or minibatch)."""
    cfg, accelerator, r = s.cfg, s.accelerator, b.rollout
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    rmask, trained = r.response_mask, s.trained
    stats: dict[str, list[float]] = defaultdict(list)
    share = cfg.minibatch_size // world
    for _epoch in range(cfg.epochs):
        order = torch.randperm(rmask.size(0), generator=rng)
        for whole_minibatch in order.split(cfg.minibatch_size):
            minibatch = whole_minibatch[rank * share : (rank + 1) * share]  # this process's share
            if s.ptx:  # PPO-ptx (InstructGPT): keep the SFT objective on demonstrations
                pick = torch.randint(len(s.ptx), (cfg.ptx_batch_size,), generator=ptx_rng)
                demos = {
                    k: v.to(device)
                    for k, v in collate([s.ptx[i] for i in pick.tolist()], s.tokenizer.pad_token_id).items()
                }
                with accelerator.no_sync(s.policy):
                    loss_ptx, ptx_aux = demonstration_loss(s.policy, s.actor, demos)
                    accelerator.backward(cfg.ptx_coef * loss_ptx)
                stats["ppo/ptx_loss"].append(float(loss_ptx.detach()))
                if ptx_aux is not None:
                    stats["ppo/ptx_aux_loss"].append(float(ptx_aux.detach()))
            micro = minibatch.split(cfg.micro_batch_size)
            minibatch_tokens = int(rmask[whole_minibatch].sum())  # every process holds the whole rollout
            for j, idx in enumerate(micro):
                t = int(rmask[idx].sum(1).max())  # columns after the longest response are padding
                lay = s.layout_of(r.ids[idx, : r.n_prompt + t], r.mask[idx, : r.n_prompt + t], r.n_prompt)
                m = rmask[idx, :t]
                # each term's weight in the minibatch's loss: a token mean's by the micro-batch's real tokens
                tokens_w = accumulation_weight(
                    "token_mean", int(m.sum()), minibatch_tokens, len(micro), world
                )
                agg_w = accumulation_weight(
                    cfg.loss_aggregation, int(m.sum()), minibatch_tokens, len(micro), world
                )
                old_logprobs, old_values = r.logprobs[idx, :t], r.values[idx, :t]
                adv, ret = b.advantages[idx, :t], b.returns[idx, :t]
                # gradients are all-reduced once per minibatch, by the backward of its last micro-batch
                with (
                    no_sync(accelerator, *(m for m, *_ in trained), sync=j == len(micro) - 1),
                    short_attention(lay.input_ids.size(1), device, s.half),
                ):
                    logits = policy_forward(s.policy, lay)  # (n, V) at the real response tokens
                    tokens = r.response_ids[idx, :t][lay.response_mask]  # (n,)
                    logprobs = lay.padded(logprobs_from_logits(logits, tokens, cfg.temperature))  # (b, t)
                    pg_loss, pg_stats = ppo_policy_loss(
                        logprobs, old_logprobs, adv, m, cfg.clip_eps, cfg.clip_eps_high,
                        cfg.loss_aggregation, cfg.max_new_tokens,
                    )  # fmt: skip
                    loss = agg_w * pg_loss
                    if cfg.kl_in == "loss":  # GRPO: KL to the reference as a loss term (k2 or k3)
                        ref = r.ref_logprobs[idx, :t]
                        kl_now = approx_kl(logprobs, ref, m, cfg.kl_estimator)  # (b, t)
                        kl_loss = aggregate_tokens(kl_now, m, cfg.loss_aggregation, cfg.max_new_tokens)
                        loss = loss + agg_w * s.kl_ctl.value * kl_loss
                        pg_stats["ppo/kl_loss"] = kl_loss.detach()
                    if cfg.entropy_coef > 0:
                        entropy = lay.padded(entropy_from_logits(logits, cfg.temperature))  # (b, t)
                        loss = loss - tokens_w * cfg.entropy_coef * masked_mean(entropy, m)
                    # a mixture of experts' load-balancing loss, where its config sets `output_router_logits`
                    if s.actor.aux_coef is not None:
                        aux = s.actor.aux_loss(lay.real)
                        loss = loss + s.actor.aux_coef * aux / len(micro)
                        pg_stats["ppo/aux_loss"] = aux.detach()
                    accelerator.backward(loss)
                    step_stats = {"ppo/policy_loss": pg_loss.detach(), **pg_stats}
                    if s.critic is not None:
                        assert s.critic_module is not None
                        values = response_values(s.critic, lay)  # (b, t)
                        vf_loss, vf_stats = value_loss(values, old_values, ret, m, cfg.value_clip)
                        critic_loss = tokens_w * cfg.vf_coef * vf_loss
                        if s.critic_module.aux_coef is not None:  # the critic's own routers, as the policy's
                            critic_aux = s.critic_module.aux_loss(lay.real)
                            critic_loss = critic_loss + s.critic_module.aux_coef * critic_aux / len(micro)
                            vf_stats["ppo/critic_aux_loss"] = critic_aux.detach()
                        accelerator.backward(critic_loss)
                        value_error = masked_mean((values.detach() - ret) ** 2, m)
                        step_stats |= {"ppo/value_loss": vf_loss.detach(), "ppo/value_error": value_error,
                                       **vf_stats}  # fmt: skip
                for key, value in step_stats.items():
                    stats[key].append(float(value))
            for model, opt, sched, norm_key in trained:
                stats[norm_key].append(finite_grad_norm(
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm),
                    f"ppo: the {'policy' if norm_key == 'ppo/grad_norm' else 'critic'}'s update"))  # fmt: skip
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
    return stats


def iteration_metrics(s: PPOState, b: Batch, stats: dict[str, list[float]]) -> dict[str, float]:
    """Step 6: the rollout's statistics and the means of the update's over its micro-batches, then over
    processes; the KL coefficient and learning rate they were computed with."""
    r, rmask = b.rollout, b.rollout.response_mask
    seq_kl = masked_sum(b.kl, rmask, dim=1)  # (B,) KL of each answer, nats
    rollout_stats = {
        "ppo/score": r.scores.mean(),
        "ppo/kl": seq_kl.mean(),
        "ppo/reward": (r.scores - s.kl_ctl.value * seq_kl).mean(),
        "ppo/entropy": masked_mean(r.entropy, rmask),
        "ppo/response_length": rmask.sum(1).float().mean(),
        "ppo/eos_rate": b.ended.float().mean(),
        "ppo/advantages_mean": masked_mean(b.advantages, rmask),
        "ppo/returns_mean": masked_mean(b.returns, rmask),
        **{f"ppo/reward_fn/{name}": torch.tensor(mean) for name, mean in b.function_means.items()},
    }
    local = {
        **{k: float(v) for k, v in rollout_stats.items()},
        **{k: sum(v) / len(v) for k, v in stats.items()},
    }
    metrics = dict(zip(local, s.reduce(torch.tensor(list(local.values()))).tolist(), strict=True))
    return metrics | {"ppo/kl_coef": s.kl_ctl.value, "ppo/lr": float(s.policy_sched.get_last_lr()[0])}


def whole_policy(s: PPOState) -> Any:
    """The policy with all its weights, on the main process (None elsewhere); every process calls it."""

    def rebuild() -> Any:  # from the configuration
        model = load_causal_lm(s.cfg.policy, tokenizer=s.tokenizer)
        return add_lora(model, s.cfg.lora, "CAUSAL_LM") if s.cfg.lora.r > 0 else model

    return sharding.whole_model(s.policy_model, s.is_sharded, s.accelerator.is_main_process, rebuild)


def save_checkpoint(s: PPOState, iteration: int) -> None:
    """Models, optimisers, schedules, KL controller and guard at this iteration (atomic); every process calls it."""
    s.accelerator.wait_for_everyone()
    is_main, named = s.accelerator.is_main_process, s.cfg.fsdp  # named: resumable on another process count
    policy_state = sharding.full_state_dict(s.policy_model, is_main) if s.is_sharded else None
    critic_state = None
    if s.critic_module is not None and s.is_sharded:
        critic_state = sharding.full_state_dict(s.critic_module.model, is_main)
    state = {"policy_optimizer": sharding.optimizer_state(s.actor, s.policy_opt, named),
             "policy_scheduler": s.policy_sched.state_dict(), "kl_ctl": s.kl_ctl.state_dict(),
             "guard": asdict(s.guard)}  # fmt: skip
    if s.critic_module is not None and s.critic_opt is not None and s.critic_sched is not None:
        state |= {
            "critic_optimizer": sharding.optimizer_state(s.critic_module, s.critic_opt, named),
            "critic_scheduler": s.critic_sched.state_dict(),
        }

    def save_files(path: Path) -> None:  # the main process only
        # full model, or the adapter
        save_model_files(s.policy_model, path / "policy", policy_state)
        s.tokenizer.save_pretrained(path / "policy")
        if s.critic_module is not None:
            save_model_files(s.critic_module.model, path / "critic", critic_state)

    s.run_dir.save_checkpoint(iteration, save_files, state, keep=s.cfg.keep_checkpoints)


def run_guard(s: PPOState, iteration: int) -> dict[str, float]:
    """Step 7: the guard's evaluation, logged; the policy saved as the best if it is. Every process calls it."""
    m = guard_eval(s.actor, s.reference, s.critic_module, s.scorer, s.tokenizer, s.guard_prompts, s.cfg,
                   s.autocast, s.layout_of, s.gold_fn, s.reduce, s.is_sharded, s.guard_index, s.reward_functions,
                   s.guard_rows)  # fmt: skip
    best = s.guard.observe(iteration, m, s.cfg.guard_patience, s.cfg.kl_budget)  # the same on every process
    whole = whole_policy(s) if best else None
    if whole is not None:
        save_policy(s.run_dir.dir / "best", whole, s.tokenizer)
        write_json(s.run_dir.dir / "best" / "guard.json", {"iteration": iteration, **m})
    s.run_dir.log(iteration, m)
    return m


def run(
    cfg: PPOConfig, resume: bool = False, quiet: bool = False, gold_fn: GoldFn | None = None
) -> dict[str, Any]:
    s = set_up(cfg, resume, gold_fn)
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    n_iterations = min(cfg.iterations, cfg.max_steps) if cfg.max_steps else cfg.iterations
    prompts_per_batch = cfg.batch_size // cfg.samples_per_prompt
    plan = BatchPlan(len(s.prompt_ids), prompts_per_batch, prompts_per_batch // world, epochs=cfg.iterations,
                     seed=cfg.seed, world_size=world, rank=rank, name="prompts per batch (ppo.batch_size / "
                     "ppo.samples_per_prompt)", source=cfg.prompts_file)  # fmt: skip
    progress = Progress(n_iterations, "ppo", s.accelerator.is_main_process, quiet, initial=s.start)
    guard_on = bool(s.guard_prompts)
    if guard_on and s.start == 0:
        progress.line(0, **run_guard(s, 0))  # the initial policy is the baseline (and the first "best")
    metrics: dict[str, float] = {}
    if s.start and s.accelerator.is_main_process and s.run_dir.metrics_path.exists():
        # resumed at its last iteration (killed while saving): the result reports that iteration's metrics
        logged = [
            row for row in read_metrics(s.run_dir.metrics_path) if row["step"] == s.start and "ppo/kl" in row
        ]
        metrics = {k: v for k, v in (logged[-1] if logged else {}).items() if k != "step"}
    done = s.start
    for iteration in range(s.start, n_iterations):
        if s.guard.stop_reason:
            break
        t0 = time.perf_counter()
        # each sample draws from a stream named by (seed, iteration, its place in the global batch), and the
        # minibatch order is one permutation of the global batch: the same samples and updates on any number of
        # processes, and a resumed run draws the same ones
        seed = cfg.seed * 1_000_003 + iteration
        rng = torch.Generator().manual_seed(seed)  # minibatch order
        ptx_rng = torch.Generator().manual_seed(seed * 1024 + rank)  # PPO-ptx picks, each process its own

        # 1.-4. generate, score, rewards with KL penalty, advantages
        batch = rollout(s, next(plan.micro_batches(iteration)), iteration)
        t_rollout = time.perf_counter() - t0

        # 5. update
        stats = update(s, batch, rng, ptx_rng)

        # 6. log: means over this iteration's micro-batches, then over processes; the KL controller adapts
        metrics = iteration_metrics(s, batch, stats)
        metrics |= {"ppo/rollout_s": t_rollout, "ppo/iteration_s": time.perf_counter() - t0}
        s.kl_ctl.update(metrics["ppo/kl"], cfg.batch_size)
        done = iteration + 1
        progress.update(done, int(batch.rollout.response_mask.sum()), score=metrics["ppo/score"],
                        kl=metrics["ppo/kl"])  # fmt: skip
        if done % cfg.log_every == 0 or done == n_iterations:
            s.run_dir.log(done, metrics)
            progress.line(
                done, **{k.removeprefix("ppo/"): metrics[k] for k in ("ppo/score", "ppo/kl", "ppo/clipfrac")}
            )

        # 7. reward-hacking guard on held-out prompts; 8. checkpoint (atomic)
        if guard_on and (done % cfg.guard_every == 0 or done == n_iterations):
            progress.line(done, **run_guard(s, done))
        if done % cfg.save_every == 0 or done == n_iterations or s.guard.stop_reason:
            save_checkpoint(s, done)
    progress.close()

    s.accelerator.wait_for_everyone()
    whole = whole_policy(s)
    if whole is not None:
        save_policy(s.run_dir.dir / "final", whole, s.tokenizer)
        summary = {"stage": "ppo", "advantage_estimator": cfg.advantage_estimator, "iterations": done,
                   "stop_reason": s.guard.stop_reason or "completed", "best_iteration": s.guard.best_iteration,
                   "best_score": s.guard.best_score if guard_on else None, "policy": cfg.policy,
                   "reward_model": cfg.reward_model, **metrics}  # fmt: skip
        write_json(s.run_dir.dir / "summary.json", summary)
    s.run_dir.finish()
    s.accelerator.wait_for_everyone()
    return {
        "stop_reason": s.guard.stop_reason or "completed",
        "best_iteration": s.guard.best_iteration,
        **metrics,
    }
