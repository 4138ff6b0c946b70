"""Best-of-n sampling: n answers to each prompt from a policy, scored by a reward model, the best one kept
(Stiennon et al. 2020; Nakano et al. 2021). Shared by `rlhf bon` (its output is SFT data) and `rlhf eval`
(best-of-n as an inference-time policy). Its KL to the sampling policy is at most log n - (n - 1) / n nats
(Stiennon et al. 2020, appendix G.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.engine.decoding import SamplingParams, decode_responses, fit_context, generate, left_pad
from rlhf.models.heads import sequence_rewards
from rlhf.models.loading import context_length
from rlhf.models.tokens import encode_prompts, stop_ids


@dataclass
class BestOfN:
    """One prompt's n answers, their scores, and which is best."""

    prompt: str
    answers: list[str]
    scores: list[float]
    ended: list[bool]
    n_tokens: list[int]  # answer tokens, EOS included

    @property
    def best(self) -> int:
        return max(range(len(self.scores)), key=self.scores.__getitem__)


def kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || policy) in nats: log n - (n - 1) / n. It is reached only as every answer's
    probability goes to 0 (Beirami et al. 2024); where the policy repeats its answers the true KL is lower, e.g.
    0.131 against 0.193 for two answers of probability 0.5 at n = 2."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(
    policy: PreTrainedModel, reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
    n: int, params: SamplingParams, no_eos_penalty: float | None = -3.0, batch_size: int = 128,
    generator: torch.Generator | None = None,
) -> list[BestOfN]:  # fmt: skip
    """n sampled answers per prompt, scored by the reward model (normalised units) at their last token."""
    eos, pad = stop_ids(tokenizer), tokenizer.pad_token_id
    rm_device = next(reward_model.parameters()).device
    # cut here, not only in generate: the reward model scores the prompt the answer was sampled after
    prompt_ids = fit_context(
        encode_prompts(tokenizer, prompts), context_length(policy), params.max_new_tokens
    )
    flat = [ids for ids in prompt_ids for _ in range(n)]  # row i is answer i % n of prompt i // n
    texts: list[str] = []
    scores: list[float] = []
    ended: list[bool] = []
    n_tokens: list[int] = []
    for i in range(0, len(flat), batch_size):
        gen = generate(policy, flat[i : i + batch_size], params, eos, pad, generator=generator)
        sequences = [
            p + [t for t, m in zip(ids, mask, strict=True) if m]
            for p, ids, mask in zip(flat[i : i + batch_size], gen.response_ids.tolist(),
                                    gen.response_mask.tolist(), strict=True)
        ]  # fmt: skip
        ids, mask = (t.to(rm_device) for t in left_pad(sequences, pad))  # (b, W) each
        rm = sequence_rewards(reward_model, ids, mask).float()  # (b,)
        if no_eos_penalty is not None:
            rm = torch.where(gen.ended.to(rm_device), rm, torch.full_like(rm, no_eos_penalty))
        texts += decode_responses(tokenizer, gen)
        scores += rm.tolist()
        ended += gen.ended.tolist()
        n_tokens += gen.response_mask.sum(1).tolist()
    return [
        BestOfN(prompt, *(x[k * n : (k + 1) * n] for x in (texts, scores, ended, n_tokens)))  # type: ignore[arg-type]
        for k, prompt in enumerate(prompts)
    ]
