"""The LM loop's loss (rlhf.train.lm_loop.NextTokenLoss): the lean forward gives transformers' loss and gradients,
and the loop takes it exactly where the weights are a plain, whole Llama; a mixture of experts whose config asks
for router logits trains on transformers' loss with its load-balancing term."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig

from rlhf.config import ArchConfig, SFTConfig, TrainConfig
from rlhf.models.loading import build_causal_lm, load_causal_lm, load_tokenizer
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.runs import Run, read_metrics
from rlhf.train.common import lean_forward, make_accelerator
from rlhf.train.lm_loop import IGNORE, NextTokenLoss, collate, collate_packed, evaluate, fit, packs
from tests.archs import save_tiny

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
        for batch_of in (lambda ex: collate(ex, 0), lambda ex: collate_packed(ex, 0, False, None)):
            result = evaluate(NextTokenLoss(model, lean), examples(), batch_of, micro_batch_size=2)
            assert result["loss"] == pytest.approx(float(loss_sum) / n_labelled, rel=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_rows_loss_and_gradients(attention: str) -> None:
    """Sequences end to end in a row, each seeing only itself from position 0, train as in rows of their own:
    the same summed loss and gradients through transformers' forward and the lean one; a sequence's first
    label (never predicted) is not learned from the end of the sequence before it."""
    model = build_model()
    model.config._attn_implementation = attention
    # + fully labelled sequences, some of which first-fit packing puts after another one in its row
    g = torch.Generator().manual_seed(3)
    extra = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 3, 7, 4, 2, 5, 3, 6, 4, 5, 3, 4)]
    train = [*examples(), *({"input_ids": ids, "labels": ids} for ids in extra)]
    works, additive = packs(model, train)
    assert works and additive == (attention == "eager")
    padded = collate(train, pad_id=0)
    packed = collate_packed(train, 0, additive, hidden_size=None)
    assert packed["attention_mask"].dim() == 4 and packed["input_ids"].numel() < padded["input_ids"].numel()
    assert int(packed["real"].sum()) == int(padded["real"].sum())
    starts = (packed["position_ids"] == 0) & (packed["real"] == 1)
    assert starts[:, 1:].any()  # a sequence that starts within a row, after another
    results = []
    for batch, lean in ((padded, False), (packed, False), (packed, True)):
        model.zero_grad()
        loss = NextTokenLoss(model, lean)(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]
        )
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_ref, grads_ref), *others = results
    for loss, grads in others:
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
        for name, grad in grads_ref.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_only_where_they_compute_fewer_positions(model) -> None:
    """Sequences of one length (pretraining blocks), or a few whose rows would round up to ROW_MULTIPLE, stay
    padded; a model whose attention takes no custom mask, or whose forward drops position ids, is never packed."""
    same_length = [{"input_ids": [5] * 8, "labels": [5] * 8}] * 9
    assert collate_packed(same_length, 0, False, None)["attention_mask"].dim() == 2
    assert (
        collate_packed(examples(), 0, False, None)["attention_mask"].dim() == 2
    )  # 3 sequences: 4 rows of 16
    many = examples() * 4  # 12 sequences of 11, 6 and 9 tokens: 8 rows of 16 against 12 of 11
    assert collate_packed(many, 0, False, None)["attention_mask"].dim() == 4
    assert packs(model, examples())[0]
    model.config._attn_implementation = "flash_attention_2"  # takes no custom 4-D mask
    try:
        assert not packs(model, examples())[0]
    finally:
        model.config._attn_implementation = "sdpa"
    forward = model.forward  # a forward that drops position ids with its other keyword arguments (Falcon's)
    model.forward = lambda input_ids, attention_mask=None, **kwargs: forward(input_ids, attention_mask)
    try:
        assert not packs(model, examples())[0]
    finally:
        del model.forward
    assert packs(model, examples())[0]


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


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("routed", [True, False], ids=["output_router_logits", "no_router_logits"])
def test_a_mixture_of_experts_trains_on_its_load_balancing_loss_where_its_config_asks(
    tmp_path: Path, routed: bool, pack: bool
) -> None:
    """A Mixtral whose config sets `output_router_logits`: the loss of a step is transformers' loss for the same
    batch with labels, the next-token loss + router_aux_loss_coef x its `aux_loss`, which is logged; without
    it, the next-token loss alone. Packed rows give the loss of padded ones: the load-balancing term weighs
    each real token once."""
    path = save_tiny("mixtral", tmp_path / "moe")
    config = AutoConfig.from_pretrained(path)  # the checkpoint's config, as a user sets it
    config.output_router_logits = routed
    config.router_aux_loss_coef = 0.5  # far from 0, so that the term shows in the loss
    config.save_pretrained(path)
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tokenizer=tok)
    train = examples()
    padded = collate(train, int(tok.pad_token_id))
    batch = {k: padded[k] for k in ("input_ids", "attention_mask", "labels")}
    assert (batch["attention_mask"] == 0).any()  # padding, which the load-balancing loss leaves out
    with torch.no_grad():
        routed_out = model(**batch, output_router_logits=True)
        nll = model(**batch, output_router_logits=False).loss
    cfg = SFTConfig(out_dir=str(tmp_path / "run"), batch_size=3, micro_batch_size=3, max_steps=1, lr=1e-3)
    run = Run(cfg.out_dir, cfg)
    fit(stage="sft", model=model, tokenizer=tok, train=train, held_out=[], cfg=cfg,
        accelerator=make_accelerator("fp32"), run=run, checkpoint=None, quiet=True, pack=pack)  # fmt: skip
    logged = read_metrics(run.metrics_path)[0]
    aux = float(routed_out.aux_loss)
    assert aux > 0
    if routed:
        assert logged["sft/loss"] == pytest.approx(float(routed_out.loss), rel=1e-5)
        assert logged["sft/loss"] == pytest.approx(float(nll) + 0.5 * aux, rel=1e-5)
        assert logged["sft/aux_loss"] == pytest.approx(aux, rel=1e-5)
    else:
        assert logged["sft/loss"] == pytest.approx(float(nll), rel=1e-5)
        assert "sft/aux_loss" not in logged


def test_the_expert_count_is_read_under_each_familys_name_and_its_absence_is_a_config_error() -> None:
    from types import SimpleNamespace

    from rlhf.errors import ConfigError
    from rlhf.models.wrappers import expert_count

    assert expert_count(SimpleNamespace(num_local_experts=8)) == 8  # Mixtral
    assert expert_count(SimpleNamespace(num_local_experts=None, num_experts=60)) == 60  # Qwen2-MoE
    assert expert_count(SimpleNamespace(n_routed_experts=64)) == 64  # DeepSeek
    with pytest.raises(ConfigError, match="no expert count"):
        expert_count(SimpleNamespace(model_type="dbrx"))
