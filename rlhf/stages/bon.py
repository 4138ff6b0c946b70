"""`rlhf bon`: best-of-n sampling, n answers to each prompt from a policy and the one the reward model scores
highest kept (Stiennon et al. 2020; Nakano et al. 2021). As an inference-time policy it is the cheapest
optimiser of the reward model: no training, and its KL to the sampling policy is at most log n - (n - 1) / n
nats (Stiennon et al. 2020, appendix G.3). Its output is SFT data for rejection-sampling fine-tuning
(`rlhf sft --set sft.train_file=runs/bon.jsonl`): one row per prompt,
  {"prompt", "response", "score", "scores": [all n], "ended", "n", "policy"},
with `messages` too (the prompt's conversation and the answer as the assistant's turn) where the prompt came as
messages: SFT reads that conversation with the chat template, so the answer's turn ends with the template's
end-of-turn token (`<|im_end|>`), as the policy's own turns do, and not with the EOS a plain response gets.
Answers that never end score `no_eos_penalty`, as in PPO, so a rambling answer wins only if all n ramble; such a
prompt is left out of the file (`keep_unfinished` keeps it), since SFT would learn the cut answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rlhf.config import BonConfig
from rlhf.data.jsonl import check_output_file, write_json, write_jsonl
from rlhf.data.preferences import as_content
from rlhf.data.prompts import read_prompt_conversations
from rlhf.engine.best_of_n import BestOfN, best_of_n, kl_bound
from rlhf.engine.decoding import SamplingParams
from rlhf.errors import from_setting
from rlhf.models.heads import load_reward_model
from rlhf.models.loading import check_same_tokenizer, load_causal_lm, load_tokenizer
from rlhf.train.common import resolve_precision

log = logging.getLogger(__name__)


def run(cfg: BonConfig) -> dict[str, Any]:
    """Best-of-n over the prompts file; writes the kept answers (and a summary beside them)."""
    start = time.perf_counter()
    with from_setting("bon.policy"):
        tokenizer = load_tokenizer(cfg.policy, cfg.add_pad_token)
    # read before any output: bad input leaves nothing behind
    with from_setting("bon.prompts_file"):
        conversations = read_prompt_conversations(cfg.prompts_file, cfg.max_prompts, tokenizer)
    check_output_file(cfg.out, "bon.out")
    prompts = [text for text, _ in conversations]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_causal_lm(cfg.policy, tokenizer=tokenizer).eval().to(device)  # type: ignore[arg-type]
    reward_model = load_reward_model(cfg.reward_model, tokenizer=tokenizer).eval().to(device)  # type: ignore[arg-type]
    with from_setting("bon.reward_model"):
        rm_tokenizer = load_tokenizer(cfg.reward_model, cfg.add_pad_token)
    check_same_tokenizer(tokenizer, rm_tokenizer, "bon.policy", "bon.reward_model")
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    bf16 = resolve_precision(cfg.precision) == "bf16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        results = best_of_n(policy, reward_model, tokenizer, prompts, cfg.n, params, cfg.no_eos_penalty,
                            cfg.batch_size, torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    rows = [
        _row(r, messages, cfg)
        for r, (_, messages) in zip(results, conversations, strict=True)
        if cfg.keep_unfinished or r.ended[r.best]
    ]
    unfinished = sum(not r.ended[r.best] for r in results)
    if unfinished and not cfg.keep_unfinished:
        log.warning("bon: %d of %d prompts left out: none of their %d answers ended within max_new_tokens (%d)",
                    unfinished, len(results), cfg.n, cfg.max_new_tokens)  # fmt: skip
    write_jsonl(cfg.out, rows)
    summary = {
        "stage": "bon",
        "prompts": len(results),
        "written": len(rows),
        "unfinished": unfinished,
        "n": cfg.n,
        "best_score": sum(r.scores[r.best] for r in results) / len(results),
        "mean_score": sum(sum(r.scores) / len(r.scores) for r in results) / len(results),
        "eos_rate": sum(r.ended[r.best] for r in results) / len(results),
        "kl_bound": kl_bound(cfg.n),
        "seconds": time.perf_counter() - start,
        "out": cfg.out,
    }
    write_json(f"{cfg.out}.summary.json", summary)
    return summary


def _row(result: BestOfN, messages: list[dict[str, str]] | None, cfg: BonConfig) -> dict[str, Any]:
    """One prompt's kept answer as an SFT row; a prompt that came as messages keeps them, the answer as the
    assistant's turn after them, which SFT reads before `prompt` and renders with the chat template."""
    answer = result.answers[result.best]
    best = result.best
    row = {"prompt": result.prompt, "response": answer, "score": result.scores[best], "scores": result.scores,
           "ended": result.ended[best], "n": cfg.n, "policy": cfg.policy}  # fmt: skip
    if messages is not None:
        row["messages"] = [*messages, {"role": "assistant", "content": as_content(answer)}]
    return row
