"""Supervised training sections: next-token pretraining on a corpus (`rlhf pretrain`) and SFT on
demonstrations (`rlhf sft`)."""

from __future__ import annotations

from pydantic import Field

from rlhf.config.base import ArchConfig, LoraSettings, TrainConfig


class PretrainConfig(TrainConfig):
    """`rlhf pretrain`: next-token prediction on packed blocks of a corpus."""

    out_dir: str = Field("runs/pretrain", description="run directory")
    train_file: str = Field(
        "data/demo/pretrain.txt",
        description="corpus: a text file (documents split by blank lines), or `text` rows of a JSONL, JSON, Parquet "
        "or CSV file, a saved datasets folder or a hub id (NAME[:CONFIG][@SPLIT])",
    )
    eval_file: str | None = Field(None, description="held-out corpus; default: a split of train_file")
    eval_fraction: float = Field(
        0.02, ge=0, lt=1, description="share of documents held out when eval_file is unset"
    )
    model: str | None = Field(
        None, description="start from this checkpoint (local dir or hub id); unset = new model"
    )
    tokenizer: str | None = Field(
        None, description="tokenizer dir or hub id; unset = train a byte-level BPE on the corpus"
    )
    vocab_size: int = Field(1024, ge=64, description="vocabulary size of a newly trained tokenizer")
    arch: ArchConfig = Field(default_factory=ArchConfig, description="architecture of a new model")
    block_size: int = Field(128, gt=1, description="tokens per packed training block")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW")
    batch_size: int = Field(32, gt=0, description="blocks per optimiser step, over all processes")
    epochs: int = Field(1, gt=0, description="passes over the corpus")
    max_eval_blocks: int = Field(200, gt=0, description="held-out blocks used per evaluation")


class SFTConfig(TrainConfig):
    """`rlhf sft`: supervised fine-tuning on prompt -> response demonstrations, loss on response tokens only."""

    out_dir: str = Field("runs/sft", description="run directory")
    model: str = Field("runs/pretrain/final", description="checkpoint to fine-tune (local dir or hub id)")
    train_file: str = Field(
        "data/demo/sft.jsonl",
        description="{prompt, completion}, {prompt, response}, {messages} or {text} rows (completion and prompt "
        "may be message lists): a JSONL, JSON, Parquet or CSV file, a saved datasets folder or a hub id "
        "(NAME[:CONFIG][@SPLIT])",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="our field -> the data's column, renamed before reading (train and eval files), e.g. "
        "{prompt: instruction, completion: output}",
    )
    eval_file: str | None = Field(None, description="held-out demonstrations; default: a split of train_file")
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="share held out when eval_file is unset: the file's first rows, in its order "
        "(a file sorted by source holds out one source: shuffle it, or give eval_file)",
    )  # fmt: skip
    max_seq_len: int = Field(
        128,
        gt=1,
        description="prompt + response tokens: a longer demonstration's response is "
        "cut at the end; one whose prompt alone fills them is dropped (both counted in the log)",
    )
    pack_sequences: bool = Field(
        True, description="train on a micro-batch's demonstrations packed end to end into rows, not padded"
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="LoRA adapters instead of full fine-tuning (checkpoints hold the adapters; final is merged)",
    )
    lr: float = Field(3e-4, gt=0, description="peak learning rate of AdamW")
    epochs: int = Field(2, gt=0, description="passes over the demonstrations")
