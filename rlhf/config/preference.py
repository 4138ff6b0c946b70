"""Sections of the stages that learn from preference files: the reward model (`rlhf reward`, with its
normalisation settings) and DPO (`rlhf dpo`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config.base import LoraSettings, Section, TrainConfig, lift_flat_lora
from rlhf.data.preference_io import Format


class NormaliseSettings(Section):
    """After training: shift (and scale) rewards so the SFT policy's answers score mean 0 (std 1)."""

    enabled: bool = Field(True, description="set the normalisation constants after training")
    policy: str | None = Field(
        None, description="policy whose answers define 0; default: reward.model (the SFT checkpoint)"
    )
    prompts_file: str | None = Field(
        None,
        description="{prompt} or {messages} rows (any source of docs/formats.md); default: the distinct "
        "prompts of the preference data",
    )
    completions_file: str | None = Field(
        None, description="{prompt, completion} rows (any source) to score instead of sampling"
    )
    n_prompts: int = Field(256, gt=0, description="reference prompts answered (one answer each)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the reference answers")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass of the reference answers")
    max_new_tokens: int = Field(48, gt=0, description="longest reference answer in tokens")
    scale: bool = Field(False, description="also divide by the std, so reference answers score std 1")


class PreferenceTrainConfig(TrainConfig):
    """What the stages that learn from preference files share (the reward model, DPO): the files and their split."""

    train_file: str = Field(
        "runs/votes.jsonl",
        description="preferences in any layout of docs/formats.md: a JSONL/JSON/Parquet/CSV file, a saved "
        "datasets folder or a hub id NAME[:CONFIG][@SPLIT]",
    )
    format: Format = Field("auto", description="layout of the preference data (auto = detected per row)")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="our field -> the data's column, renamed before reading, e.g. {prompt: question}",
    )
    skip_bad_rows: bool = Field(
        False,
        description="skip malformed rows of the preference files (counted in the log) instead of stopping",
    )
    eval_file: str | None = Field(
        None, description="held-out preferences; default: a split of train_file by prompt"
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of prompts held out when eval_file is unset"
    )


class RewardConfig(PreferenceTrainConfig):
    """`rlhf reward`: a Bradley-Terry reward model on preference data, initialised from the SFT policy."""

    out_dir: str = Field("runs/reward", description="run directory")
    model: str = Field("runs/sft/final", description="SFT checkpoint the reward model starts from")
    init_from: str | None = Field(
        None, description="warm start: a trained reward model whose weights and head training continues from"
    )
    max_seq_len: int = Field(
        128, gt=1, description="prompt + completion + EOS tokens; longer ones are cut, EOS kept"
    )
    group_sessions: bool = Field(
        True, description="merge one labeler's judgements of one prompt into one batch element (InstructGPT)"
    )
    use_margins: bool = Field(True, description="use the data's margins in -log sigmoid(r_c - r_r - margin)")
    shared_prefix: bool = Field(
        True,
        description="forward a group's common prompt once, its answers as branches (tree attention mask)",
    )
    labeler_weights: str | None = Field(
        None, description="JSON/YAML mapping labeler -> loss weight (0 drops a labeler)"
    )
    default_labeler_weight: float = Field(
        1.0, ge=0, description="weight of labelers absent from labeler_weights"
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA instead of full fine-tuning")
    normalise: NormaliseSettings = Field(
        default_factory=NormaliseSettings, description="reward normalisation"
    )
    gold_eval: bool = Field(
        False, description="after training, compare with the demo task's gold utility (CLI only)"
    )
    lr: float = Field(5e-5, gt=0, description="peak learning rate of AdamW")
    batch_size: int = Field(16, gt=0, description="groups (one judgement of one prompt) per optimiser step")
    micro_batch_size: int = Field(16, gt=0, description="groups per forward pass on one process")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    eval_every: int = Field(50, gt=0, description="evaluate on the held-out split every N steps")


SIMPO_BETA = 2.0  # Meng et al. 2024's default
REFERENCE_FREE = ("simpo", "orpo")  # DPO losses without a reference model


class DPOConfig(PreferenceTrainConfig):
    """`rlhf dpo`: direct preference optimisation of the SFT policy on preference data, no reward model, no sampling.

    `batch_size` and `micro_batch_size` count judgements (a pair, or a ranking with its C(K,2) pairs, each of
    its answers forwarded once); the loss is the mean over the pairs of the global batch.
    """

    out_dir: str = Field("runs/dpo", description="run directory")
    policy: str = Field(
        "runs/sft/final", description="SFT checkpoint: the initial policy (and the reference)"
    )
    reference: str | None = Field(
        None, description="reference policy of the log-ratios; unset = the initial policy"
    )
    max_seq_len: int = Field(
        128, gt=1, description="prompt + answer + EOS tokens; longer answers are cut (and lose their EOS)"
    )
    loss: Literal["sigmoid", "ipo", "simpo", "orpo", "kto"] = Field(
        "sigmoid",
        description="sigmoid = DPO; ipo = IPO's squared loss; simpo = SimPO (length-normalised, no reference); "
        "orpo = ORPO (the chosen answer's NLL plus an odds-ratio term, no reference); kto = KTO (answers judged "
        "good or bad one at a time: feedback records, and the winners and losers of comparisons)",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="beta: scale of the implicit reward beta * log(pi / pi_ref); unset with simpo: 2.0; with "
        "orpo, lambda: the odds-ratio term's weight beside the NLL",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="conservative DPO: assumed rate of flipped labels (sigmoid and simpo)"
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the reward margin a chosen answer must win by")
    kto_desirable_weight: float = Field(
        1.0,
        gt=0,
        description="kto: weight of a desirable answer's loss (lambda_D; raise it where they are fewer)",
    )
    kto_undesirable_weight: float = Field(
        1.0, gt=0, description="kto: weight of an undesirable answer's loss"
    )
    pack_sequences: bool = Field(
        True, description="forward a micro-batch's sequences packed end to end into rows, not padded"
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="LoRA adapters instead of full fine-tuning; the reference is then the adapter-off policy",
    )
    lr: float = Field(1e-5, gt=0, description="peak learning rate of AdamW")
    batch_size: int = Field(32, gt=0, description="judgements (pairs or rankings) per optimiser step")
    micro_batch_size: int = Field(16, gt=0, description="judgements per forward pass on one process")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    eval_every: int = Field(50, gt=0, description="evaluate on the held-out split every N steps")

    @model_validator(mode="before")
    @classmethod
    def _flat_lora_keys(cls, data: Any) -> Any:
        data = lift_flat_lora(data)
        # SimPO's beta scales a mean log-prob per token, not a log-ratio: its paper's 2.0 where none is given
        # (at DPO's 0.1, the default margin of 0.5 would ask the chosen answer to win by 5 nats a token)
        if isinstance(data, dict) and data.get("loss") == "simpo" and "beta" not in data:
            data = {**data, "beta": SIMPO_BETA}
        return data

    @model_validator(mode="after")
    def _smoothing_needs_a_logistic_loss(self) -> DPOConfig:
        if self.label_smoothing and self.loss in (
            "ipo",
            "orpo",
            "kto",
        ):  # no flipped-label term in their losses
            raise ValueError(f"label_smoothing applies to the sigmoid and simpo losses, not {self.loss}")
        if self.loss in REFERENCE_FREE and self.reference:
            raise ValueError(f"loss {self.loss} has no reference model: unset reference")
        return self
