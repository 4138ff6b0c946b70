"""The base of every config section, and the sections the others build on: the architecture of a new model,
the demo data, LoRA adapters, and what every training stage shares (TrainConfig)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp32"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]
# Settings that every stage loading a model or tokenizer has, described once
PrecisionSetting = Annotated[Precision, Field(description="auto = bf16 autocast where the hardware has it")]
AddPadToken = Annotated[
    bool,
    Field(
        description="give a tokenizer without PAD, or whose PAD is EOS, a new PAD token (embeddings grow by one "
        "row, never attended nor sampled); false = refuse such a tokenizer"
    ),
]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment, and a number
    is finite (no setting means anything at infinity or NaN)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSettings(Section):
    """LoRA adapters (peft) instead of full fine-tuning; merged into the weights when saved."""

    r: int = Field(0, ge=0, description="adapter rank (0 = off: train all weights)")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="module names that get adapters, or all-linear: every linear layer but the head, whatever "
        "the architecture names them",
    )

    @model_validator(mode="after")
    def _targets_need_a_rank(self) -> LoraSettings:
        if self.r == 0 and self.target_modules != "all-linear":
            log.warning("lora.target_modules is set but lora.r is 0: LoRA is off, every weight trains")
        return self


def lift_flat_lora(data: Any) -> Any:
    """A section's `lora_r` and `lora_alpha`, as earlier configs of PPO and DPO wrote them, read as `lora.r` and
    `lora.alpha`: every stage says LoRA one way, and a run written before still resumes."""
    if not isinstance(data, dict) or not {"lora_r", "lora_alpha"} & set(data):
        return data
    data = dict(data)
    lora = dict(data.get("lora") or {})
    for flat, nested in (("lora_r", "r"), ("lora_alpha", "alpha")):
        if flat in data:
            lora.setdefault(nested, data.pop(flat))
    return {**data, "lora": lora}


def choices_as_text(value: Any) -> Any:
    """A judge's answer tokens as text: `--set eval.judge_choices=[1,2]` means the tokens "1" and "2". YAML reads
    an unquoted yes/no/on/off as a boolean, whose text ("True") is not what was written, and a judge would read
    the wrong tokens: refused, with the quoting that keeps the words."""
    if not isinstance(value, list | tuple):
        return value
    if any(isinstance(v, bool) for v in value):
        raise ValueError("YAML reads unquoted yes/no/on/off as true/false; quote the words: ['yes', 'no']")
    return tuple(str(v) for v in value)


class ArchConfig(Section):
    """Architecture of a new causal LM (Llama-style) built from scratch; ignored when loading a checkpoint."""

    hidden_size: int = Field(128, gt=0, description="width of the residual stream")
    intermediate_size: int = Field(384, gt=0, description="width of the MLP")
    num_hidden_layers: int = Field(4, gt=0, description="number of transformer blocks")
    num_attention_heads: int = Field(4, gt=0, description="attention heads")
    num_key_value_heads: int = Field(4, gt=0, description="key/value heads (fewer than heads = GQA)")
    max_position_embeddings: int = Field(256, gt=0, description="context length in tokens")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    tie_word_embeddings: bool = Field(True, description="share input and output embeddings")

    @model_validator(mode="after")
    def _heads_divide(self) -> ArchConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


class DataConfig(Section):
    """The demo task generator (`rlhf data demo`)."""

    seed: int = Field(0, description="seed of the generator; same seed, same files")
    n_pretrain: int = Field(30000, gt=0, description="dialogues in the pretraining corpus")
    n_sft: int = Field(3000, gt=0, description="SFT demonstrations")
    n_rl_prompts: int = Field(2000, gt=0, description="prompts for candidate generation and PPO")
    n_eval_prompts: int = Field(300, gt=0, description="held-out prompts for evaluation")
    n_tune_prompts: int = Field(200, gt=0, description="tuning prompts (the PPO guard's checkpoint choice)")
    sft_rude_rate: float = Field(0.15, ge=0, le=1, description="share of SFT demonstrations that are rude")
    sft_wrong_rate: float = Field(0.1, ge=0, le=1, description="share of SFT demonstrations that are wrong")
    sft_ramble_rate: float = Field(0.1, ge=0, le=1, description="share of SFT demonstrations that ramble")
    sft_nonanswer_rate: float = Field(
        0.05, ge=0, le=1, description="share of SFT demonstrations that do not answer what was asked"
    )
    sft_template_weights: list[float] = Field(
        [0.15, 0.35, 0.25, 0.15, 0.1],
        min_length=1,
        description="weights of the ways to say an SFT "
        "demonstration's answer, from the most concise to the wordiest (the last repeats for longer lists)",
    )
    n_cai_docs: int = Field(
        0, ge=0, description="critique/revision and comparison documents added to the corpus (docs/cai.md)"
    )
    pretrain_family_weights: dict[str, float] = Field(
        {},
        description="weights of question families in the pretraining corpus, where they differ from the "
        "prompts' (arithmetic 3, fact 3, yesno 2, greeting 1, thanks 1, unknown 2, harm 2, provocation 1)",
    )
    n_reading_docs: int = Field(
        0, ge=0, description="yes/no questions about creatures the user describes, added to the corpus"
    )
    n_reading_sft: int = Field(
        0, ge=0, description="SFT demonstrations of yes/no questions about creatures the user describes"
    )

    @field_validator("pretrain_family_weights")
    @classmethod
    def _known_families(cls, weights: dict[str, float]) -> dict[str, float]:
        from rlhf.data.demo_task import family_weights

        family_weights(weights)  # raises, naming what is wrong
        return weights


class TrainConfig(Section):
    """What every training stage shares: optimiser, schedule, batch sizes, precision, logging, checkpoints."""

    out_dir: str = Field("runs/stage", description="run directory (config, metrics.jsonl, checkpoints)")
    seed: int = Field(0, description="random seed (each process adds its rank)")
    lr: float = Field(3e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and norms)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor as a fraction of lr")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping by global norm (1e9: none)")
    batch_size: int = Field(32, gt=0, description="sequences per optimiser step, over all processes")
    micro_batch_size: int = Field(16, gt=0, description="sequences per forward pass on one process")
    epochs: int = Field(1, gt=0, description="passes over the training data")
    max_steps: int = Field(
        0, ge=0, description="train for this many optimiser steps, in place of `epochs` (0 = run all epochs)"
    )
    precision: PrecisionSetting = "auto"
    log_every: int = Field(10, gt=0, description="log metrics every N steps")
    log_with: list[Tracker] = Field(
        default_factory=list,
        description="also log metrics to these accelerate trackers (tensorboard writes RUN/trackers/; wandb and "
        "mlflow read their own settings from the environment); metrics.jsonl is always written",
    )
    eval_every: int = Field(100, gt=0, description="evaluate on the held-out split every N steps")
    save_every: int = Field(200, gt=0, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="keep this many latest checkpoints")
    fsdp: bool = Field(
        False,
        description="shard parameters, gradients and optimiser state across processes with torch FSDP2 "
        "(fully_shard; launch with accelerate launch or torchrun); checkpoints stay whole models",
    )
    fsdp_cpu_offload: bool = Field(
        False,
        description="with fsdp: keep the sharded parameters and optimiser state in CPU memory (GPU runs)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in the backward pass: less memory, more compute",
    )
    add_pad_token: AddPadToken = True

    @model_validator(mode="after")
    def _micro_divides(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by micro_batch_size ({self.micro_batch_size})"
            )
        return self
