"""sample_rows: per-row greedy, top-k, top-p and temperature, checked against hand-computed cases."""

from __future__ import annotations

import math

import torch

from rlhf.serve.sampling import sample_rows

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))  # probabilities 0.5, 0.3, 0.15, 0.05


def _rows(n: int, **per_row: float) -> dict[str, torch.Tensor]:
    return {
        "temperature": torch.full((n,), per_row.get("temperature", 1.0)),
        "top_p": torch.full((n,), per_row.get("top_p", 1.0)),
        "top_k": torch.full((n,), int(per_row.get("top_k", 0))),
    }


def test_uniform_maps_to_the_token_whose_cdf_interval_holds_it() -> None:
    # cumulative 0.5, 0.8, 0.95, 1.0
    uniforms = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.96, 0.9999])
    tokens = sample_rows(LOGITS.expand(7, 4), **_rows(7), uniforms=uniforms)
    assert tokens.tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_each_row_keeps_its_own_parameters() -> None:
    logits = LOGITS.expand(4, 4)
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 0.6, 1.0, 1.0])  # row 1: nucleus {0, 1} (0.5 < 0.6 <= 0.8)
    top_k = torch.tensor([0, 0, 1, 0])  # row 2: only the argmax
    uniforms = torch.tensor([0.99, 0.99, 0.99, 0.99])
    tokens = sample_rows(logits, temperature, top_p, top_k, uniforms)
    assert tokens.tolist() == [0, 1, 0, 3]  # greedy; nucleus ends at 1; top-1; untruncated tail


def test_nucleus_renormalises_the_kept_mass() -> None:
    # top_p 0.6 keeps tokens 0 and 1 with mass 0.8: token 0 has 0.5 / 0.8 = 0.625 of it
    uniforms = torch.tensor([0.62, 0.63])
    tokens = sample_rows(LOGITS.expand(2, 4), **_rows(2, top_p=0.6), uniforms=uniforms)
    assert tokens.tolist() == [0, 1]


def test_temperature_sharpens_the_distribution() -> None:
    # at T = 0.5 the probabilities go as p^2: 0.25, 0.09, ... over 0.365 -> token 0 has 0.685
    mass0 = 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025)
    uniforms = torch.tensor([mass0 - 1e-3, mass0 + 1e-3])
    tokens = sample_rows(LOGITS.expand(2, 4), **_rows(2, temperature=0.5), uniforms=uniforms)
    assert tokens.tolist() == [0, 1] and math.isclose(mass0, 0.6849, abs_tol=1e-4)
