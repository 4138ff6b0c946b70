"""The loop section (`rlhf loop`): rounds of generation, votes, reward model and policy training."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config.base import Section


class LoopConfig(Section):
    """`rlhf loop`: rounds of generate -> people (or the simulated panel) vote -> reward model -> PPO -> eval.

    The other sections configure each stage as it runs inside a round (generate, panel, reward, ppo, eval);
    the loop sets their paths, policies and seeds per round.
    """

    out_dir: str = Field("runs/loop", description="loop directory: one round-N/ folder per round")
    name: str = Field("loop", description="name of the loop run and of its project in the feedback store")
    db: str | None = Field(
        None,
        description="feedback store URL (sqlite:///FILE or postgresql://...); unset = OUT_DIR/feedback.db",
    )
    feedback_url: str | None = Field(
        None, description="a running `rlhf label serve` to vote through; unset = the app runs in-process"
    )
    sft_policy: str = Field(
        "runs/demo/sft/final", description="the initial policy (version 'sft') and the fixed KL reference"
    )
    prompts_file: str = Field(
        "data/demo/rl_prompts.jsonl", description="pool of prompts the rounds draw from"
    )
    rounds: int = Field(3, gt=0, description="rounds to run (a finished loop given more rounds continues)")
    prompts_per_round: int = Field(150, gt=0, description="prompts answered by the policy each round")
    share_old_prompts: float = Field(
        0.25, ge=0, le=1, description="share of a round's prompts drawn again from earlier rounds"
    )
    k: int = Field(4, ge=2, le=8, description="candidate answers per prompt from the current policy")
    cross_version: bool = Field(
        True, description="also sample the previous policy version, for cross-version pairs"
    )
    k_previous: int = Field(2, ge=1, le=8, description="answers per prompt from the previous policy version")
    pairs_per_round: int = Field(
        600, ge=0, description="comparison tasks made per round, the labeling budget (0 = every pair)"
    )
    active: bool = Field(
        True, description="choose pairs where bootstrap reward heads disagree most (else all at random)"
    )
    random_share: float = Field(
        0.25, ge=0, le=1, description="share of the budget chosen at random (marked, for unbiased evaluation)"
    )
    ensemble_size: int = Field(6, ge=2, le=32, description="bootstrap heads that score the disagreement")
    ensemble_l2: float = Field(
        0.01, ge=0, description="L2 penalty of each bootstrap head (on standardised features)"
    )
    panel: bool = Field(True, description="the simulated panel votes through the labeling API")
    panel_votes_per_poll: int = Field(
        0, ge=0, description="panel votes cast between two looks at the vote count (0 = all open tasks)"
    )
    overlap: int = Field(1, ge=1, le=100, description="labelers per task")
    min_votes: int = Field(
        0, ge=0, description="votes a round needs before training (0 = every task answered `overlap` times)"
    )
    vote_timeout_s: float = Field(3600.0, gt=0, description="longest wait for min_votes, in seconds")
    on_timeout: Literal["continue", "stop"] = Field(
        "continue", description="with too few votes at the timeout: train on what arrived, or stop the loop"
    )
    poll_s: float = Field(2.0, gt=0, description="seconds between two looks at the vote count")
    undo_window_s: float = Field(
        60.0,
        ge=0,
        description="the labeling app's undo window (RLHF_LABEL_UNDO_WINDOW_S): a person's vote counts, and is "
        "trained on, once it can no longer be undone",
    )
    method: Literal["ppo", "dpo"] = Field(
        "ppo",
        description="how a round trains the policy: ppo = reward model on all votes, then PPO; dpo = online DPO on "
        "the round's votes (the policy's own answers), from and against the current policy, no reward model",
    )
    extra_projects: list[str] = Field(
        default_factory=list,
        description="other projects of the loop's feedback store whose pairwise votes each round's reward model "
        "also trains on, e.g. [production] (the A/B votes users cast through `rlhf serve` or `rlhf gateway`); "
        "method ppo only",
    )
    warm_start: bool = Field(True, description="each round's reward model starts from the previous one")
    kl_budget_step: float | None = Field(
        None, gt=0, description="round r's PPO keeps its policy within r x this KL (nats) of the SFT policy"
    )
    ppo: dict[str, Any] = Field(
        default_factory=dict,
        description="ppo settings that differ inside the loop, laid over the ppo section (e.g. lr, guard_every)",
    )
    seed: int = Field(
        0, description="seed of prompt sampling, generation and pair selection (plus the round)"
    )

    @model_validator(mode="after")
    def _extra_projects_train_a_reward_model(self) -> LoopConfig:
        if self.name in self.extra_projects or len(set(self.extra_projects)) < len(self.extra_projects):
            raise ValueError(
                f"loop.extra_projects: each project once, and not the loop's own ({self.name!r})"
            )
        # online DPO trains on the round's own answers, from and against the current policy: production pairs
        # come from whatever policy was served, and all of them so far would be trained on again every round
        if self.extra_projects and self.method == "dpo":
            raise ValueError("loop.extra_projects: their votes train the reward model, and loop.method dpo has "
                             "none (it trains on the round's own answers); use method ppo")  # fmt: skip
        return self
