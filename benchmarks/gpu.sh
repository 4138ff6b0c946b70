#!/usr/bin/env bash
# The benchmarks that time a CUDA GPU, as they are, on a machine with one and this project's venv (`make setup`
# there installs torch's CUDA build from PyPI):
#
#     bash benchmarks/gpu.sh [more options of benchmarks.architectures, e.g. --archs llama qwen2 --reps 5]
#
# generation: `rlhf.engine.decoding.generate` vs `generate()`, batch 64, bf16, on the GPU;
# architectures: PPO vs TRL, reward-model training vs TRL's RewardTrainer and generation vs `generate()` for
# Llama, Qwen2, GPT-NeoX and Gemma at 4M and 30M parameters (the stages and TRL take the GPU by themselves),
# MFU against the bf16 matmul peak of the same GPU measured in the same run.
# Results: benchmarks/results/generation.cuda.json and architectures.cuda.json, each with its own section of
# docs/performance.md beside the CPU's.
# First, the training stages' smoke tests on the GPU (the stages take it by themselves; the GPU-only best-of-n
# test runs): the two-process tests need two devices, and the killed-run tests race a run that a GPU finishes
# before its first checkpoint is seen, so those are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
"$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script times a GPU")'
"$python" -m pytest -q -p no:cacheprovider -n 4 tests/smoke/test_bon.py tests/smoke/test_reward.py \
    tests/smoke/test_dpo.py tests/smoke/test_ppo.py tests/smoke/test_critic_free.py tests/smoke/test_stages.py \
    -k "not two_processes and not fewer_guard_prompts and not killed_run"
"$python" -m benchmarks.generation --device cuda --sizes tiny small
"$python" -m benchmarks.architectures --device cuda --sizes 4M 30M "$@"
