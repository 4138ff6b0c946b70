"""One TRL DPOTrainer run, for benchmarks/dpo_throughput.py; runs inside TRL's own venv (no rlhf import).

Prints one JSON line: {"pairs", "seconds" (train_runtime), "pairs_per_s", "eval_accuracy", "trl"}.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import transformers
import trl
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="HF causal-LM checkpoint dir (with tokenizer)")
    parser.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected}")
    parser.add_argument("--eval-data", required=True, help="held-out JSONL of {prompt, chosen, rejected}")
    parser.add_argument("--batch-size", type=int, required=True, help="pairs per forward pass")
    parser.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimiser step")
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    train = load_dataset("json", data_files=args.data, split="train")
    held_out = load_dataset("json", data_files=args.eval_data, split="train")
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, num_train_epochs=1, learning_rate=args.lr,
            lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.01, max_grad_norm=1.0, beta=args.beta,
            loss_type=["sigmoid"], bf16=args.bf16, use_cpu=True, report_to="none", save_strategy="no",
            eval_strategy="no", logging_steps=10_000, max_length=args.max_length, disable_dropout=True,
            disable_tqdm=True, dataloader_num_workers=0, seed=0,
            # as ours: no activation checkpointing (TRL turns it on by default), reference log-probs computed once
            gradient_checkpointing=False, precompute_ref_log_probs=True,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=model, args=config, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
        )
        pairs = len(trainer.train_dataset)
        seconds = float(trainer.train().metrics["train_runtime"])
        accuracy = float(trainer.evaluate()["eval_rewards/accuracies"])
    print(json.dumps({"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds,
                      "eval_accuracy": accuracy, "trl": trl.__version__, "transformers": transformers.__version__}))  # fmt: skip


if __name__ == "__main__":
    main()
