"""TRL 0.29 PPOTrainer on the workload of benchmarks/ppo_bench.py; run by that benchmark in .bench-venvs/trl029.

Prints one JSON line: seconds per iteration (median after the first), each iteration's mean score, max RSS.
Not imported by rlhf-loop: it runs in TRL's own venv.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import transformers
import trl
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer


class Clock(TrainerCallback):
    """Time between PPO iterations (one `on_step_end` per iteration) and each iteration's logged score."""

    def __init__(self) -> None:
        self.t, self.cpu = time.perf_counter(), time.process_time()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.scores: list[float] = []
        self.kl: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        now, cpu = time.perf_counter(), time.process_time()
        self.times.append(now - self.t)
        self.cpu_times.append(cpu - self.cpu)
        self.t, self.cpu = now, cpu

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and "objective/scores" in logs:
            self.scores.append(float(logs["objective/scores"]))
            self.kl.append(float(logs["objective/kl"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paths", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--hparams", required=True)
    args = parser.parse_args()
    paths, h = json.loads(args.paths), json.loads(args.hparams)
    torch.manual_seed(h["seed"])
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"])
    reference = AutoModelForCausalLM.from_pretrained(paths["policy"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(paths["reward_model"], num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(paths["reward_model"], num_labels=1)
    with open(paths["prompts"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    dataset = Dataset.from_dict({"input_ids": tokenizer(prompts, add_special_tokens=False)["input_ids"]})
    # TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps, and its accelerator steps
    # the optimiser every gradient_accumulation_steps micro-batches across minibatches: with the rollout batch
    # made of accumulation (the builds before this one), it stepped once per epoch where ours steps once per
    # minibatch. Here the rollout batch is one "device batch" cut into minibatches of one micro-batch each, so
    # both take an optimiser step per minibatch.
    if h["micro_batch"] != h["minibatch"]:
        raise SystemExit("TRL's PPOTrainer steps once per minibatch only when a minibatch is one micro-batch")
    config = PPOConfig(
        output_dir=args.out, per_device_train_batch_size=h["batch"], gradient_accumulation_steps=1,
        num_mini_batches=h["batch"] // h["minibatch"],
        num_ppo_epochs=h["epochs"], total_episodes=args.iterations * h["batch"], response_length=h["max_new_tokens"],
        local_rollout_forward_batch_size=h["batch"], learning_rate=h["lr"], lr_scheduler_type="constant",
        kl_coef=h["kl_coef"], kl_estimator="k1", cliprange=h["clip_eps"], cliprange_value=h["value_clip"],
        vf_coef=h["vf_coef"], gamma=h["gamma"], lam=h["lam"], temperature=h["temperature"], missing_eos_penalty=None,
        stop_token="eos", max_grad_norm=h["max_grad_norm"], adam_beta2=0.999, weight_decay=0.0, seed=h["seed"],
        bf16=h["bf16"], use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", logging_steps=1, num_sample_generations=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    clock = Clock()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         callbacks=[clock])  # fmt: skip
    clock.t, clock.cpu = time.perf_counter(), time.process_time()
    trainer.train()
    keep = slice(1, None) if len(clock.times) > 1 else slice(None)  # the first iteration pays one-off costs
    print(json.dumps({"iteration_s": statistics.median(clock.times[keep]),
                      "iteration_cpu_s": statistics.median(clock.cpu_times[keep]), "times": clock.times, "score": clock.scores,
                      "kl": clock.kl, "trl": trl.__version__, "transformers": transformers.__version__,
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))  # fmt: skip


if __name__ == "__main__":
    main()
