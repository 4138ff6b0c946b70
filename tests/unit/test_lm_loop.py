"""The LM loop's loss (rlhf.train.lm_loop.NextTokenLoss): the lean forward gives transformers' loss and gradients,
and the loop takes it exactly where the weights are a plain, whole Llama."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf.config import ArchConfig, TrainConfig
from rlhf.models.loading import build_causal_lm
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.train.common import lean_forward, make_accelerator
from rlhf.train.lm_loop import IGNORE, NextTokenLoss, collate, evaluate

ARCH = ArchConfig(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)  # fmt: skip


def build_model() -> torch.nn.Module:
    tok = train_bpe_tokenizer(["User: Hello there friend\nAssistant: Hi!"] * 30, vocab_size=280)
    return build_causal_lm(ARCH, tok, seed=5)


@pytest.fixture(scope="module")
def model():
    return build_model()


def examples() -> list[dict[str, list[int]]]:
    """Three examples of different lengths; the first two have prompts without labels, as in SFT."""
    g = torch.Generator().manual_seed(2)
    out = []
    for length, prompt in ((11, 4), (6, 2), (9, 0)):
        ids = torch.randint(3, 250, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def test_the_lean_loss_and_gradients_are_transformers(model) -> None:
    batch = collate(examples(), pad_id=0)
    assert (batch["attention_mask"] == 0).any()  # rows are padded
    results = []
    for lean in (False, True):
        model.zero_grad()
        loss = NextTokenLoss(model, lean)(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_hf, grads_hf), (loss_lean, grads_lean) = results
    assert loss_hf > 0
    torch.testing.assert_close(loss_lean, loss_hf, atol=1e-5, rtol=1e-5)
    assert grads_lean.keys() == grads_hf.keys()
    for name, grad in grads_hf.items():
        torch.testing.assert_close(grads_lean[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_evaluate_counts_only_labelled_tokens(model) -> None:
    batch = collate(examples(), pad_id=0)
    with torch.no_grad():
        loss_sum = NextTokenLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    n_labelled = (11 - 4) + (6 - 2) + (9 - 1)  # no prediction of a row's first token
    for lean in (False, True):
        result = evaluate(NextTokenLoss(model, lean), examples(), pad_id=0, micro_batch_size=2)
        assert result["loss"] == pytest.approx(float(loss_sum) / n_labelled, rel=1e-5)


def test_the_loop_takes_the_lean_forward_only_for_a_plain_whole_llama() -> None:
    accelerator, cfg = make_accelerator("fp32"), TrainConfig()
    model = build_model()
    assert lean_forward(model, accelerator, cfg)
    # sharded weights or recomputed activations: the model's own forward
    assert not lean_forward(model, accelerator, cfg.model_copy(update={"fsdp": True}))
    # the wrapper names the model's layer class, as FSDP's auto-wrap policy reads it off the prepared module
    assert set(NextTokenLoss(model)._no_split_modules) == {"LlamaDecoderLayer"}
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not lean_forward(lora, accelerator, cfg)
    assert not lean_forward(lora.get_base_model(), accelerator, cfg)  # LoRA layers replaced its projections
