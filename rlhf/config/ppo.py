"""The PPO section (`rlhf ppo`, and its critic-free variants RLOO, GRPO and REINFORCE++)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config.base import LoraSettings, TrainConfig, lift_flat_lora


class PPOConfig(TrainConfig):
    """`rlhf ppo`: PPO against a frozen reward model with a per-token KL penalty to a frozen reference.

    Shared fields read per PPO iteration: `batch_size` is rollouts per iteration, `epochs` PPO epochs over them,
    `log_every`/`save_every` count iterations, `max_steps` stops early after that many iterations.
    """

    out_dir: str = Field("runs/ppo", description="run directory")
    policy: str = Field(
        "runs/sft/final", description="SFT checkpoint: the initial policy (and the reference)"
    )
    reward_model: str | None = Field(
        "runs/reward/final",
        description="reward model checkpoint (frozen); null = reward_functions alone score the answers",
    )
    reference: str | None = Field(
        None, description="reference policy for the KL penalty; unset = the initial policy"
    )
    critic: str | None = Field(
        None, description="critic initialisation; unset = the reward model (without one, the policy)"
    )
    prompts_file: str = Field(
        "data/demo/rl_prompts.jsonl",
        description="{prompt} or {messages} rows to train on: a file, saved datasets folder or hub id",
    )
    eval_prompts_file: str | None = Field(
        None,
        description="held-out {prompt} or {messages} rows for the reward-hacking guard; unset = no guard",
    )
    ptx_file: str | None = Field(
        None, description="demonstrations for PPO-ptx, rows as sft.train_file's (any data source)"
    )
    iterations: int = Field(100, gt=0, description="PPO iterations (generate, score, update)")
    max_steps: int = Field(
        0,
        ge=0,
        description="stop after this many iterations, the schedule still planned for `iterations` (0 = all)",
    )
    log_every: int = Field(10, gt=0, description="log metrics every N iterations")
    save_every: int = Field(200, gt=0, description="checkpoint every N iterations (and at the end)")
    batch_size: int = Field(64, gt=0, description="rollouts per iteration, over all processes")
    minibatch_size: int = Field(32, gt=0, description="rollouts per optimiser step, over all processes")
    micro_batch_size: int = Field(32, gt=0, description="rollouts per forward pass on one process")
    pack_sequences: bool = Field(
        True,
        description="score and train on a micro-batch's sequences packed end to end into rows, not padded "
        "(off by itself for attention kernels that take no 4-D mask)",
    )
    epochs: int = Field(2, gt=0, description="PPO epochs over each iteration's rollouts")
    lr: float = Field(1e-5, gt=0, description="peak learning rate of the policy's AdamW")
    critic_lr: float = Field(5e-5, gt=0, description="peak learning rate of the critic's AdamW")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up, in optimiser steps")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="cosine decay floor (1.0 = constant lr)")
    eval_every: int = Field(1, gt=0, description="not used by PPO: the held-out check runs every guard_every")
    # generation
    max_new_tokens: int = Field(48, gt=0, description="longest response in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs use logits / T)")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1.0 = off)")
    ref_temperature: float | None = Field(
        None,
        gt=0,
        description="temperature the reference's log-probs are read at for the KL penalty (None = temperature): "
        "lower pulls the policy towards the reference's likelier answers where the reward says nothing; "
        "the guard's KL is still to the reference at `temperature` (docs/ppo.md: the demo keeps it off)",
    )
    # reward
    no_eos_penalty: float | None = Field(
        -3.0, description="score of a response that never emits EOS, instead of the RM's (None = RM score)"
    )
    length_penalty: float = Field(
        0.0,
        ge=0,
        description="taken off each answer's score per response token, for a reward model that misses the "
        "people's preference for concise answers (0 = off; docs/ppo.md: the demo keeps it off)",
    )
    reward_functions: list[str] = Field(
        [],
        description="Python reward functions ('module:function' or 'file.py:function'), called as TRL's "
        "reward_funcs are; each value, times its weight, is added to the reward model's score "
        "(rlhf/train/reward_functions.py)",
    )
    reward_function_weights: list[float] | None = Field(
        None, description="one weight per reward function (unset = 1 each)"
    )
    reward_ensemble: list[str] = Field(
        [],
        description="further reward models (same tokenizer) scored beside reward_model: the score is "
        "their mean minus ensemble_penalty x their std (Coste et al. 2023)",
    )
    ensemble_penalty: float = Field(
        0.0, ge=0, description="weight of the reward models' disagreement (std) taken off the score"
    )
    safety_reward_model: str | None = Field(
        None,
        description="a second reward model, for safety (Llama 2's two reward models): it alone scores the answers "
        "to the prompts safety_prompts match (and, with safety_threshold, any answer it scores below that); "
        "reward_model (and reward_ensemble) the rest",
    )
    safety_prompts: list[str] = Field(
        [],
        description="regular expressions searched in each prompt's text (chat template included), case-"
        "insensitively: a prompt one of them matches is scored by safety_reward_model",
    )
    safety_threshold: float | None = Field(
        None,
        description="an answer to any prompt that safety_reward_model scores below this is scored by it "
        "(unset = routed by the prompt only)",
    )
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the per-token KL penalty (initial value)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1",
        description="per-token KL estimator: k1 in the reward, k2 or k3 as a loss term. k3 in the reward has the "
        "same mean, but its policy gradient is that of KL(pi||ref) - KL(ref||pi): near the reference it barely "
        "pulls the policy back (docs/ppo.md)",
    )
    kl_in: Literal["reward", "loss"] = Field(
        "reward",
        description="KL to the reference as a per-token penalty in the reward, or as a loss term (GRPO)",
    )
    adaptive_kl: bool = Field(False, description="adapt beta to keep the KL near kl_target (Ziegler et al.)")
    kl_target: float = Field(
        6.0, gt=0, description="target KL per sequence (nats) of the adaptive controller"
    )
    kl_horizon: int = Field(10000, gt=0, description="horizon in rollouts of the adaptive controller")
    whiten_rewards: bool = Field(False, description="scale per-token rewards to std 1 (mean kept)")
    # advantages and losses
    advantage_estimator: Literal["gae", "rloo", "grpo", "reinforce_pp"] = Field(
        "gae", description="gae = PPO with a critic; rloo, grpo, reinforce_pp: critic-free (docs/methods.md)"
    )
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="answers sampled per prompt, k (rloo, grpo need k >= 2); batch_size counts answers",
    )
    grpo_scale_by_std: bool = Field(True, description="grpo: divide by the group's std (false = Dr. GRPO)")
    clip_eps_high: float | None = Field(
        None, gt=0, description="upper policy ratio clip (DAPO's clip-higher, e.g. 0.28); unset = clip_eps"
    )
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean",
        description="policy loss over tokens: token_mean (PPO, DAPO), seq_mean_token_mean (GRPO), "
        "seq_mean_token_sum_norm (Dr. GRPO: sum / (rows x max_new_tokens))",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_eps: float = Field(0.2, gt=0, description="policy ratio clip range")
    value_clip: float = Field(0.2, gt=0, description="value clip range around the rollout's values")
    vf_coef: float = Field(
        1.0, gt=0, description="weight of the value loss (the critic has its own optimiser)"
    )
    entropy_coef: float = Field(0.0, ge=0, description="weight of the entropy bonus")
    ptx_coef: float = Field(0.0, ge=0, description="weight of the SFT loss on ptx_file (PPO-ptx); 0 = off")
    ptx_batch_size: int = Field(16, gt=0, description="demonstrations per optimiser step for PPO-ptx")
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="LoRA adapters on policy and critic instead of full fine-tuning; the reference is the "
        "adapter-off policy",
    )
    # reward-hacking guard
    guard_every: int = Field(10, gt=0, description="run the guard on held-out prompts every N iterations")
    guard_prompts: int = Field(64, gt=0, description="held-out prompts per guard evaluation")
    guard_patience: int = Field(
        3, gt=0, description="stop after this many guard evaluations in a row where proxy rose and gold fell"
    )
    kl_budget: float | None = Field(None, gt=0, description="stop when the guard's KL (nats) exceeds this")
    guard_gold: bool = Field(
        False, description="score guard answers with the demo task's gold judge (demo only; never trained on)"
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_lora_keys(cls, data: Any) -> Any:
        return lift_flat_lora(data)

    @model_validator(mode="after")
    def _sizes_divide(self) -> PPOConfig:
        if self.batch_size % self.minibatch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by minibatch_size ({self.minibatch_size})"
            )
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by samples_per_prompt ({self.samples_per_prompt})"
            )
        if self.advantage_estimator in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"advantage_estimator {self.advantage_estimator} needs samples_per_prompt >= 2")
        if not self.reward_model and not self.reward_functions:
            raise ValueError(
                "reward_model is unset and there are no reward_functions: nothing scores the answers"
            )
        if not self.reward_model and (self.reward_ensemble or self.safety_reward_model):
            raise ValueError(
                "reward_ensemble and safety_reward_model score beside reward_model, which is unset"
            )
        if self.reward_function_weights is not None and len(self.reward_function_weights) != len(
            self.reward_functions
        ):
            raise ValueError(f"reward_function_weights has {len(self.reward_function_weights)} weights for "
                             f"{len(self.reward_functions)} reward_functions")  # fmt: skip
        if self.safety_reward_model and not (self.safety_prompts or self.safety_threshold is not None):
            raise ValueError("safety_reward_model needs safety_prompts or safety_threshold (what it scores)")
        if (self.safety_prompts or self.safety_threshold is not None) and not self.safety_reward_model:
            raise ValueError(
                "safety_prompts and safety_threshold need safety_reward_model (where they route)"
            )
        for n, pattern in enumerate(self.safety_prompts):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"safety_prompts.{n}: {pattern!r} is not a regular expression: {e}"
                ) from None
        if self.kl_in == "loss" and self.kl_estimator == "k1":
            raise ValueError(
                "kl_in 'loss' needs kl_estimator k2 or k3 (k1's gradient is zero in expectation)"
            )
        return self
