"""One TRL RewardTrainer run, for benchmarks/reward_throughput.py; runs inside TRL's own venv (no rlhf import).

Prints one JSON line: {"pairs": trained pairs, "seconds": train_runtime, "pairs_per_s": ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
import transformers
import trl
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="HF causal-LM checkpoint dir (with tokenizer)")
    parser.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected}")
    parser.add_argument("--batch-size", type=int, required=True, help="pairs per forward pass")
    parser.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimiser step")
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = load_dataset("json", data_files=args.data, split="train")
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.01,
            max_grad_norm=1.0, bf16=args.bf16, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
            logging_steps=10_000, max_length=args.max_length, disable_dropout=True, disable_tqdm=True,
            dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        pairs = len(trainer.train_dataset)
        metrics = trainer.train().metrics
    seconds = float(metrics["train_runtime"])
    print(
        json.dumps(
            {
                "pairs": pairs,
                "seconds": seconds,
                "pairs_per_s": pairs / seconds,
                "trl": trl.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
