"""The models a stage trains or reads, as modules of their own (ModelForward) so that DDP, FSDP and autocast wrap
their forwards: the policy's forward (Actor), the critic, which reads a value at every token, and the reward model,
one score at each sequence's last token; and loading PPO's policy, reference, critic and reward model.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.mixtral import modeling_mixtral

from rlhf.config import PPOConfig
from rlhf.engine import lean_llama
from rlhf.engine.packing import TokenLayout
from rlhf.errors import ConfigError
from rlhf.models.heads import backbone, head_scores, load_reward_model, load_scalar_model, normalisation
from rlhf.models.loading import disable_dropout, load_causal_lm
from rlhf.models.lora import add_lora


class ModelForward(torch.nn.Module):
    """A training loop's forward around a Hugging Face model (PPO's actor and critic, the LM loss, the rewards),
    as a module of its own so that `accelerator.prepare` (DDP, autocast) wraps it. `lean`: the backbone runs
    through rlhf.engine.lean_llama (`lean_forward` says when). The model's layer classes are named as the model
    names them, for FSDP's auto-wrap policy.

    A mixture of experts whose config sets `output_router_logits` returns its routers' logits from every forward
    of its backbone: they are kept (`router_logits`) for `aux_loss`, the load-balancing loss a training loop adds
    with weight `aux_coef`."""

    def __init__(self, model: Any, lean: bool = False) -> None:
        super().__init__()
        self.model: Any = model  # a Hugging Face model, or its LoRA wrapper
        self.lean = lean
        self._no_split_modules = getattr(model, "_no_split_modules", None)
        self._head_alone: bool | None = (
            None  # whether the LM head can run alone (`head_runs_alone`); None: not asked
        )
        self.aux_coef = router_aux_coef(self.hf_model)
        self.experts = 0 if self.aux_coef is None else expert_count(self.hf_model.config)
        self.router_logits: tuple[Tensor, ...] | None = None  # (R W, E) per MoE layer, of the last forward
        # set around a whole forward that asks only its backbone for router logits (`logits_at`)
        self._routed_backbone = False
        if self.aux_coef is not None:
            # caught on the backbone's way out: the scalar heads' forwards and the backbone alone drop them
            backbone(self.hf_model).register_forward_hook(self._catch_router_logits)
            backbone(self.hf_model).register_forward_pre_hook(self._ask_router_logits, with_kwargs=True)

    def _catch_router_logits(self, _module: torch.nn.Module, _inputs: Any, out: Any) -> None:
        self.router_logits = getattr(out, "router_logits", None)

    def _ask_router_logits(
        self, _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self._routed_backbone:
            kwargs["output_router_logits"] = True
        return args, kwargs

    def aux_loss(self, token_weights: Tensor) -> Tensor:
        """The routers' load-balancing loss over the last forward's (R, W) rows, as transformers computes a
        causal LM's `aux_loss` (the model family's `load_balancing_loss_func`), each position weighted by
        `token_weights` (R, W): 1 for a token, 0 for padding, k for a shared prefix that k sequences read. That
        function takes its mask as per-token weights, so packed rows and shared prefixes give the loss of every
        sequence in a row of its own; a 4-D attention mask, as transformers would pass it, does not fit."""
        router_logits, self.router_logits = self.router_logits, None
        if router_logits is None:
            raise RuntimeError("aux_loss: the last forward returned no router logits")
        loss = _balancing_loss(self.hf_model)(
            router_logits, self.experts, self.hf_model.config.num_experts_per_tok, token_weights
        )
        # the function returns the int 0 when it finds no router logits to weigh
        return loss if isinstance(loss, Tensor) else token_weights.new_zeros((), dtype=torch.float32)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The Hugging Face model (LoRA layers, if any, are injected into it in place)."""
        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        return cast(PreTrainedModel, model)

    def logits_at(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None, at: Tensor
    ) -> Tensor:
        """The LM's logits (N, V) at the flat positions `at` (N,) of the (R, W) rows. The LM head runs only there,
        on the lean forward's hidden states or the backbone's, wherever that gives the model's own logits
        (`head_runs_alone`); otherwise the whole forward, read there. With a vocabulary of 32k-150k tokens the
        head over every position is often the largest matmul of a step."""
        if self.lean:
            if position_ids is None:  # positions from 0, as in the model's own forward
                position_ids = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
            hidden = lean_llama.hidden_states(self.model, input_ids, attention_mask, position_ids)
        elif self.head_runs_alone(input_ids):
            hidden = backbone(self.hf_model)(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).last_hidden_state
        else:
            # a mixture of experts' causal LM would compute its own load-balancing loss over `attention_mask`,
            # which fails on a 4-D mask: it is asked for none, and its backbone alone for the router logits
            routed = self.aux_coef is not None
            options = {"output_router_logits": False} if routed else {}
            self._routed_backbone = routed
            try:
                logits = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **options
                ).logits
            finally:
                self._routed_backbone = False
            return cast(Tensor, logits.flatten(0, 1)[at])  # (R, W, V) -> (N, V)
        # the head on whole blocks of 64 rows, so that its matmul keeps a few shapes (see packing.py)
        n = at.numel()
        rows = F.pad(at, (0, -(-n // 64) * 64 - n))  # (N rounded up,)
        return lm_head(self.hf_model, hidden.flatten(0, 1)[rows])[:n]  # (N, V)

    def head_runs_alone(self, input_ids: Tensor) -> bool:
        """Whether `lm_head` on the backbone's hidden states gives the model's own logits: checked once, on a
        short sequence of `input_ids`' first row, in eval mode and without autocast (an architecture that
        transforms its logits in a way `lm_head` does not know keeps its whole forward). Not for weights sharded
        by FSDP: the backbone called on its own would skip the unsharding of the weights the whole model holds."""
        if self._head_alone is None and any(isinstance(p, DTensor) for p in self.hf_model.parameters()):
            self._head_alone = False
        if self._head_alone is None:
            model, sample = self.hf_model, input_ids[:1, :8]
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
                    whole = model(input_ids=sample).logits.float()
                    alone = lm_head(model, backbone(model)(input_ids=sample).last_hidden_state).float()
                self._head_alone = whole.shape == alone.shape and torch.allclose(
                    whole, alone, rtol=1e-4, atol=1e-4
                )
            finally:
                model.train(was_training)
        return self._head_alone


def router_aux_coef(model: PreTrainedModel) -> float | None:
    """The weight of a mixture of experts' load-balancing loss in training (`router_aux_loss_coef`) where its
    config asks for that loss (`output_router_logits`, as transformers and TRL read it); None otherwise."""
    config = model.config
    if not getattr(config, "output_router_logits", False):
        return None
    return float(getattr(config, "router_aux_loss_coef", 0.0))


def expert_count(config: Any) -> int:
    """A mixture of experts' number of experts, under the names its families give it; a one-line error where
    the config names none (before any work, rather than at the first training step)."""
    names = ("num_local_experts", "num_experts", "n_routed_experts")
    experts = next((n for n in (getattr(config, k, None) for k in names) if n), None)
    if not isinstance(experts, int):
        raise ConfigError(
            f"{config.model_type}: output_router_logits is set but the config names no expert count "
            f"({', '.join(names)}); set output_router_logits: false to train without the load-balancing loss"
        )
    return experts


def _balancing_loss(model: PreTrainedModel) -> Callable[..., Any]:
    """`load_balancing_loss_func` of the model's own modeling module; Mixtral's, which most copy, elsewhere."""
    module = sys.modules.get(type(backbone(model)).__module__)
    return getattr(module, "load_balancing_loss_func", modeling_mixtral.load_balancing_loss_func)


class Actor(ModelForward):
    """The policy's logits at the real response tokens, (N, V); the LM head runs only there (`logits_at`)."""

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, response_at: Tensor
    ) -> Tensor:
        return self.logits_at(input_ids, attention_mask, position_ids, response_at)


class Critic(ModelForward):
    """The value function V(s_t) at every token, in the reward model's normalised units. Its own forward: the
    sequence-classification forward of Hugging Face would pool to the last token only."""

    def __init__(self, model: PreTrainedModel | PeftModel, lean: bool = False) -> None:
        super().__init__(model, lean)
        self.shift, self.scale = normalisation(self.hf_model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        hidden = backbone_states(
            self.hf_model, self.lean, input_ids, attention_mask, position_ids
        )  # (R, W, H)
        # the scalar head: a Linear, or PEFT's wrapper that keeps it fully trainable under LoRA
        head: Any = getattr(self.hf_model, "score", None) or self.hf_model.classifier
        return (head(hidden).squeeze(-1).float() - self.shift) / self.scale  # (R, W)


def lm_head(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    """A causal LM's logits from its final hidden states (..., H): its output embeddings, then the final soft-capping
    of the logits that some architectures apply (Gemma 2 and 3)."""
    logits = cast(Tensor, model.get_output_embeddings()(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


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
    rlhf.engine.lean_llama (default: wherever it supports the model; never for a sharded one)."""
    lean = lean_llama.supports(reward_model) if lean is None else lean
    hidden = backbone_states(
        reward_model, lean, lay.input_ids, lay.attention_mask, lay.position_ids
    )  # (R, W, H)
    return head_scores(reward_model, lay.last(hidden))


class RewardScores(ModelForward):
    """`reward_scores` as a module, so that a sharded reward model gathers its weights around this forward."""

    def forward(self, lay: TokenLayout) -> Tensor:
        return reward_scores(self.model, lay, self.lean)


class RewardEnsemble(torch.nn.Module):
    """Several reward models as one score: their mean minus `penalty` x their standard deviation, so that an
    answer the models disagree on (where their votes taught them little) earns less. Uncertainty-weighted
    optimisation, Coste et al. 2023 ("Reward model ensembles help mitigate overoptimization")."""

    def __init__(self, members: list[torch.nn.Module], penalty: float) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.penalty = penalty
        self.last_std: Tensor | None = None  # (B,) the members' disagreement on the last batch scored

    def forward(self, lay: TokenLayout) -> Tensor:
        scores = torch.stack([m(lay) for m in self.members])  # (M, B)
        self.last_std = scores.std(0, unbiased=False)  # (B,)
        return scores.mean(0) - self.penalty * self.last_std


class SafetyRouted(torch.nn.Module):
    """Two reward models as one score, as Llama 2 combines its helpfulness and safety reward models (Touvron et
    al. 2023, section 3.2.2): the safety model's score for the answers to prompts tagged as safety-relevant, and
    for any answer it scores below `threshold`; the helpfulness model's for the rest. Each model then learns
    only what its labels teach, and a preference for how to refuse never reaches the answers to questions."""

    def __init__(self, helpful: torch.nn.Module, safety: torch.nn.Module, threshold: float | None) -> None:
        super().__init__()
        self.helpful, self.safety, self.threshold = helpful, safety, threshold
        self.last_routed: Tensor | None = None  # (B,) the answers the safety model scored in the last batch

    def forward(self, lay: TokenLayout, tagged: Tensor) -> Tensor:
        """`tagged`: (B,) bool, the rows whose prompt is safety-relevant."""
        helpful, safety = self.helpful(lay), self.safety(lay)  # (B,) each
        routed = tagged.to(safety.device)
        if self.threshold is not None:
            routed = routed | (safety < self.threshold)
        self.last_routed = routed
        return torch.where(routed, safety, helpful)


Scorer = RewardScores | RewardEnsemble | SafetyRouted


def reward_scorer(
    cfg: PPOConfig, members: list[PreTrainedModel], device: Any, lean: Callable[[PreTrainedModel], bool]
) -> tuple[Scorer | None, list[RewardScores]]:
    """PPO's score from its frozen reward models (`reward_model`, then `reward_ensemble`, then
    `safety_reward_model`): the first alone, or the ensemble's penalised mean, either routed with the safety
    model if there is one (None without a reward model); and each model's forward, to shard."""
    scorers = [RewardScores(m.to(device), lean(m)) for m in members]
    if not scorers:
        return None, []
    helpful = scorers[: len(scorers) - bool(cfg.safety_reward_model)]
    scorer: Scorer = (
        RewardEnsemble(list(helpful), cfg.ensemble_penalty) if cfg.reward_ensemble else helpful[0]
    )
    if cfg.safety_reward_model:
        scorer = SafetyRouted(scorer, scorers[-1], cfg.safety_threshold)
    return scorer, scorers


def safety_tagged(cfg: PPOConfig, prompts: list[str]) -> Tensor | None:
    """(N,) bool: the prompts one of `safety_prompts` is found in, case-insensitively; None without
    `safety_reward_model`."""
    if not cfg.safety_reward_model:
        return None
    compiled = [re.compile(p, flags=re.IGNORECASE) for p in cfg.safety_prompts]
    return torch.tensor([any(c.search(prompt) for c in compiled) for prompt in prompts], dtype=torch.bool)


def load_models(
    cfg: PPOConfig, checkpoint: Path | None, tokenizer: PreTrainedTokenizerBase
) -> tuple[Any, PreTrainedModel | None, Critic | None, PreTrainedModel | None]:
    """Policy, reference (None: the policy with its LoRA adapter off), critic (None for the critic-free
    estimators) and reward model (None: reward functions alone score); dropout off."""
    lora = cfg.lora.r > 0
    # first: a causal LM given as the reward model fails here, before the critic made from it gets a new head
    reward_model = frozen_reward_model(cfg.reward_model, tokenizer) if cfg.reward_model else None
    policy: Any = load_causal_lm(
        str(checkpoint / "policy") if checkpoint and not lora else cfg.policy, tokenizer=tokenizer
    )
    critic_model: Any = None
    if cfg.advantage_estimator == "gae":
        critic_model = load_scalar_model(
            str(checkpoint / "critic")
            if checkpoint and not lora
            else cfg.critic or cfg.reward_model or cfg.policy,
            tokenizer=tokenizer,
        )
    if lora and checkpoint:
        policy = PeftModel.from_pretrained(policy, checkpoint / "policy", is_trainable=True)
        if critic_model is not None:
            critic_model = PeftModel.from_pretrained(critic_model, checkpoint / "critic", is_trainable=True)
    elif lora:
        policy = add_lora(policy, cfg.lora, "CAUSAL_LM")
        critic_model = critic_model and add_lora(critic_model, cfg.lora, "SEQ_CLS")
    reference = None
    if not lora or cfg.reference not in (None, cfg.policy):
        reference = (
            load_causal_lm(cfg.reference or cfg.policy, tokenizer=tokenizer).eval().requires_grad_(False)
        )
    for model in (policy, reference, critic_model):
        if model is not None:
            disable_dropout(model)
    return policy, reference, None if critic_model is None else Critic(critic_model), reward_model


def frozen_reward_model(path: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A reward model to score `tokenizer`'s ids with only: eval mode, no gradients, dropout off."""
    model = load_reward_model(path, tokenizer=tokenizer).eval().requires_grad_(False)
    disable_dropout(model)
    return model
