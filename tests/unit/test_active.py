"""rlhf/active.py: pair selection (budget, random share, prompts wholly random or active), bootstrap heads,
disagreement, and last-token features that do not depend on padding."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.active import disagreement, fit_bootstrap_heads, last_token_features, select_pairs
from rlhf.models.heads import build_scalar_model
from rlhf.models.loading import load_tokenizer

# 4 prompts x the 3 pairs of 3 answers
CANDIDATES = [(p, i, j) for p in range(4) for i, j in ((0, 1), (0, 2), (1, 2))]


def test_without_scores_every_pair_is_random_and_the_budget_holds() -> None:
    chosen = select_pairs(CANDIDATES, None, budget=5, random_share=0.25, seed=3)
    assert sum(len(s.pairs) for s in chosen.values()) == 5
    assert {s.how for s in chosen.values()} == {"random"}
    assert chosen == select_pairs(CANDIDATES, None, budget=5, random_share=0.25, seed=3)  # seeded
    assert sum(len(s.pairs) for s in select_pairs(CANDIDATES, None, 0, 0.25, 0).values()) == 12  # 0 = all


def test_active_pairs_are_the_most_disputed_of_prompts_the_random_draw_left() -> None:
    scores = [float(n) for n in range(len(CANDIDATES))]  # the later the pair, the more disputed
    chosen = select_pairs(CANDIDATES, scores, budget=4, random_share=0.25, seed=0)
    random_prompts = [p for p, s in chosen.items() if s.how == "random"]
    active = [(p, pair) for p, s in chosen.items() if s.how == "active" for pair in s.pairs]
    assert len(random_prompts) == 1 and len(chosen[random_prompts[0]].pairs) == 1  # round(4 * 0.25) = 1
    left = [(n, c) for n, c in enumerate(CANDIDATES) if c[0] not in random_prompts]
    top3 = sorted(left, key=lambda nc: -scores[nc[0]])[:3]
    assert sorted(active) == sorted((c[0], (c[1], c[2])) for _, c in top3)


def test_bootstrap_heads_learn_the_preferred_direction_and_disagree_where_data_is_thin() -> None:
    torch.manual_seed(0)
    truth = torch.tensor([1.0, -1.0, 0.0, 0.0])
    x = torch.randn(400, 4)
    x[:, 3] *= 0.02  # direction 3 is almost never seen in the votes
    diffs = torch.where((x @ truth > 0)[:, None], x, -x)  # chosen - rejected
    heads = fit_bootstrap_heads(diffs, n_heads=6, seed=0)
    assert heads.shape == (6, 4)
    cosine = torch.nn.functional.cosine_similarity(heads, truth[None], dim=1)
    assert bool((cosine > 0.95).all())
    assert not torch.allclose(heads[0], heads[1])  # different resamples, different heads
    a = torch.zeros(2, 4)
    b = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    spread = disagreement(heads, a, b)
    assert float(spread[0]) == 0.0  # identical answers: every head says 0.5
    manual = torch.sigmoid((a - b) @ heads.T).std(dim=1)
    assert torch.allclose(spread, manual)


def test_last_token_features_do_not_depend_on_the_batch(tiny_sft_model: Path) -> None:
    model = build_scalar_model(str(tiny_sft_model), seed=0)
    tokenizer = load_tokenizer(str(tiny_sft_model))
    short, long = (
        ("User: hi\nAssistant:", " Hello."),
        ("User: what is 2 plus 2?\nAssistant:", " It is 4, I think."),
    )
    together = last_token_features(model, tokenizer, [short, long])  # short is right-padded here
    alone = last_token_features(model, tokenizer, [short])
    assert together.shape == (2, model.config.hidden_size)
    assert torch.allclose(together[0], alone[0], atol=1e-5)
    assert not torch.allclose(together[0], together[1])
