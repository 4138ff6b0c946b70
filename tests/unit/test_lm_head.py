"""The policy's logits with the LM head run only where they are read (rlhf.models.wrappers.ModelForward.logits_at):
the same logits as the model's own forward, the head's matmul over the read positions only, and the whole
forward kept for a model whose logits the head alone does not give."""

from __future__ import annotations

import torch

from rlhf.models.wrappers import Actor
from rlhf.train.lm_loop import NextTokenLoss
from tests.archs import build_model, build_tokenizer


def _inputs(rows: int = 3, width: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    positions = torch.arange(width).expand(rows, width)
    at = torch.tensor([2, 5, 11, width + 3, 2 * width + 7])  # flat positions in the (rows, width) grid
    return ids, mask, positions, at


def test_the_head_runs_only_at_the_read_positions_and_gives_the_models_logits() -> None:
    model = build_model("gemma2", build_tokenizer("gemma")).eval()  # soft-capped logits
    ids, mask, positions, at = _inputs()
    seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    actor = Actor(model)
    ours = actor(ids, mask, positions, at)
    assert actor.head_runs_alone(ids)
    hook.remove()
    whole = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.flatten(0, 1)[at]
    torch.testing.assert_close(ours, whole, rtol=1e-5, atol=1e-5)
    assert seen[-1] == 64  # five read positions, padded to one block of 64 rows, not 3 x 12 positions


def test_a_model_whose_logits_the_head_alone_misses_keeps_its_whole_forward() -> None:
    model = build_model("llama", build_tokenizer("llama")).eval()
    model.config.final_logit_softcapping = (
        0.5  # a setting Llama's own forward does not apply: the head alone would
    )
    ids, mask, positions, at = _inputs()
    actor = Actor(model)
    ours = actor(ids, mask, positions, at)
    assert not actor.head_runs_alone(ids)
    whole = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.flatten(0, 1)[at]
    torch.testing.assert_close(ours, whole, rtol=1e-5, atol=1e-5)


def test_the_next_token_loss_reads_only_labelled_positions() -> None:
    model = build_model("qwen2", build_tokenizer("chatml"))
    ids, mask, _, _ = _inputs(2, 10)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[1, 8:] = -100  # padding
    loss = NextTokenLoss(model)(ids, mask, labels)
    logits = model(input_ids=ids, attention_mask=mask).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert model.get_output_embeddings().weight.grad is not None
