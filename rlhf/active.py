"""Active selection: send people the comparisons a reward model is least sure about.

Uncertainty comes from bootstrap heads: the current reward model's last-token features (its backbone's hidden
state at the EOS, where the reward is read) stay frozen; `n_heads` linear Bradley-Terry heads are fit on
bootstrap resamples of the votes so far; a candidate pair's disagreement is the std over heads of
P(a > b) = sigmoid(w . (f_a - f_b)). A share of the budget is still chosen uniformly at random and marked so,
which keeps an unbiased subset for evaluation (the actively chosen pairs are, by design, the hard ones).
Bootstrap ensembles as an uncertainty estimate for reward models: Gleave & Irving 2022 ("Uncertainty
estimation for language reward models"); disagreement-based query selection: Christiano et al. 2017, sec. 2.2.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.models.heads import backbone, last_token_index
from rlhf.models.tokens import encode_completions, encode_prompts

Pair = tuple[int, int, int]  # (prompt index, completion i, completion j)


@torch.no_grad()
def last_token_features(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[tuple[str, str]], batch: int = 64,
    max_len: int = 128,
) -> Tensor:  # fmt: skip
    """Backbone hidden state at the last real token of prompt + completion + EOS, (N, d), one row per text."""
    model.eval()
    pad = tokenizer.pad_token_id
    out = []
    for s in range(0, len(texts), batch):
        chunk = texts[s : s + batch]
        prompts = encode_prompts(tokenizer, [p for p, _ in chunk])
        completions = encode_completions(tokenizer, [c for _, c in chunk])
        ids = [(p + c)[-max_len:] for p, c in zip(prompts, completions, strict=True)]
        input_ids = torch.full((len(ids), max(map(len, ids))), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(input_ids)  # (B, T)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        hidden = backbone(model)(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, d)
        out.append(hidden[torch.arange(len(ids)), last_token_index(mask)].float())  # (B, d)
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


def fit_bootstrap_heads(diffs: Tensor, n_heads: int, seed: int, l2: float = 1e-2, steps: int = 100) -> Tensor:
    """Linear heads (H, d) fit on bootstrap resamples of the vote differences f_chosen - f_rejected, (P, d).

    Each head minimises its resample's mean -log sigmoid(w . x) + l2 |w|^2 (logistic regression without
    intercept: swapping a pair flips its sign). All heads are fit together by L-BFGS on the summed loss.
    """
    generator = torch.Generator().manual_seed(seed)
    n, d = diffs.shape
    # counts[h, p]: how often resample h drew vote p (multinomial bootstrap)
    draws = torch.randint(0, n, (n_heads, n), generator=generator)  # (H, P)
    counts = torch.zeros(n_heads, n).scatter_add_(1, draws, torch.ones(n_heads, n)) / n  # (H, P)
    weights = torch.zeros(n_heads, d, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        margins = weights @ diffs.T  # (H, P)
        loss = (counts * -torch.nn.functional.logsigmoid(margins)).sum() + l2 * (weights**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()


def disagreement(heads: Tensor, feat_a: Tensor, feat_b: Tensor) -> Tensor:
    """Std over heads of P(a > b), (N,): how much the bootstrap heads disagree about each pair."""
    probs = torch.sigmoid((feat_a - feat_b) @ heads.T)  # (N, H)
    return probs.std(dim=1)


@dataclass
class Selection:
    """The pairs chosen for one prompt, and how: 'random' (unbiased subset) or 'active'."""

    how: str
    pairs: list[tuple[int, int]]


def select_pairs(
    candidates: Sequence[Pair], scores: Sequence[float] | None, budget: int, random_share: float, seed: int
) -> dict[int, Selection]:
    """Choose `budget` pairs: a `random_share` of them uniformly at random, the rest by highest score among
    prompts the random draw did not touch (so each prompt is wholly 'random' or wholly 'active').
    Without scores (no reward model yet) every pair is random. Returns prompt index -> Selection."""
    rng = random.Random(seed)
    budget = len(candidates) if budget == 0 else min(budget, len(candidates))
    n_random = budget if scores is None else round(budget * random_share)
    order = list(range(len(candidates)))
    rng.shuffle(order)
    chosen: dict[int, Selection] = {}
    for idx in order[:n_random]:
        p, i, j = candidates[idx]
        chosen.setdefault(p, Selection("random", [])).pairs.append((i, j))
    if scores is not None:
        ranked = sorted(
            (idx for idx in range(len(candidates)) if candidates[idx][0] not in chosen),
            key=lambda idx: -scores[idx],
        )
        for idx in ranked[: budget - n_random]:
            p, i, j = candidates[idx]
            chosen.setdefault(p, Selection("active", [])).pairs.append((i, j))
    for sel in chosen.values():
        sel.pairs.sort()
    return dict(sorted(chosen.items()))
