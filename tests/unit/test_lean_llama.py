"""The lean Llama backbone (rlhf.engine.lean_llama) computes transformers' function: hidden states and gradients
on padded and packed rows, bf16 autocast as close to fp32 as transformers' own, and only where it applies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from rlhf.config import ArchConfig, SFTConfig
from rlhf.engine import lean_llama
from rlhf.engine.packing import packed_layout, padded_layout
from rlhf.models.heads import backbone
from rlhf.models.loading import build_causal_lm
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.train.common import lean_forward

ARCH = ArchConfig(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)  # fmt: skip  two query heads per KV head


@pytest.fixture(scope="module")
def gqa_model():
    tok = train_bpe_tokenizer(["User: Hello there friend\nAssistant: Hi!"] * 30, vocab_size=280)
    return build_causal_lm(ARCH, tok, seed=3).eval()


def family_model(kind: str) -> torch.nn.Module:
    """A Llama-family model of the lean forward's shapes: Qwen2 (biases on q, k, v), or a Llama with biases on
    every attention and MLP projection; the biases random, so that the forward must add them."""
    dims = {"vocab_size": 280, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    config = (Qwen2Config(**dims) if kind == "qwen2"
              else LlamaConfig(**dims, attention_bias=True, mlp_bias=True))  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = AutoModelForCausalLM.from_config(config)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.1)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama_biases"])
def lean_model(request, gqa_model):  # type: ignore[no-untyped-def]
    return gqa_model if request.param == "llama" else family_model(request.param)


def rollouts() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, mask, P): three left-padded prompts with right-padded responses."""
    ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor(
        [[0, 0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0, 0]]
    )
    return ids * mask, mask, 5


def real(hidden: torch.Tensor, lay) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Hidden states at the real tokens, in sequence order: (n, d), for comparing layouts."""
    return torch.cat([hidden.flatten(0, 1)[lay.response_at], hidden.flatten(0, 1)[lay.last_at]])


@pytest.mark.parametrize("packed", [False, True])
def test_hidden_states_and_gradients_match_transformers(lean_model, packed: bool) -> None:
    gqa_model = lean_model
    assert lean_llama.supports(gqa_model)
    ids, mask, p = rollouts()
    lay = packed_layout(ids, mask, p, pad_id=0) if packed else padded_layout(ids, mask, p)
    results = []
    for lean in (False, True):
        gqa_model.zero_grad()
        if lean:
            hidden = lean_llama.hidden_states(gqa_model, *lay.inputs.values())
        else:
            hidden = backbone(gqa_model)(**lay.inputs).last_hidden_state
        states = real(hidden, lay)  # (n, d)
        (states * torch.linspace(-1, 1, states.size(-1))).square().sum().backward()
        results.append(
            (states.detach(), [q.grad.clone() for q in gqa_model.parameters() if q.grad is not None])
        )
    (hf, hf_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-4)
    assert len(our_grads) == len(hf_grads) == len(list(gqa_model.model.parameters()))  # every backbone weight
    for a, b in zip(hf_grads, our_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_bf16_autocast_is_as_close_to_fp32_as_transformers(lean_model) -> None:
    gqa_model = lean_model
    ids, mask, p = rollouts()
    lay = packed_layout(ids, mask, p, pad_id=0)
    fp32 = real(backbone(gqa_model)(**lay.inputs).last_hidden_state, lay)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = real(backbone(gqa_model)(**lay.inputs).last_hidden_state, lay)
        ours = real(lean_llama.hidden_states(gqa_model, *lay.inputs.values()), lay)
    assert ours.dtype == torch.float32  # the residual stream and the norms stay in the weights' dtype
    assert (ours - fp32).abs().max() <= 2 * (theirs.float() - fp32).abs().max() + 1e-4


def test_supports_plain_whole_llama_only(gqa_model) -> None:
    lora = get_peft_model(build_causal_lm(ARCH, train_bpe_tokenizer(["a b c"] * 10, vocab_size=270)),
                          LoraConfig(r=4, target_modules="all-linear"))  # fmt: skip
    assert not lean_llama.supports(lora) and not lean_llama.supports(
        lora.get_base_model()
    )  # LoRA layers inside
    scaled = build_causal_lm(ARCH, train_bpe_tokenizer(["a b c"] * 10, vocab_size=270))
    scaled.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert not lean_llama.supports(scaled)
    assert not lean_llama.supports(torch.nn.Linear(2, 2))
    # Qwen2 with sliding-window attention in its layers: transformers' forward
    sliding = Qwen2Config(vocab_size=280, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8)  # fmt: skip
    assert lean_llama.supports(family_model("qwen2")) and not lean_llama.supports(
        AutoModelForCausalLM.from_config(sliding)
    )
    # weights off the CPU (a GPU here, the meta device): the model's own forward and its attention kernels
    off_cpu = build_causal_lm(ARCH, train_bpe_tokenizer(["a b c"] * 10, vocab_size=270))
    assert lean_llama.supports(off_cpu)
    off_cpu.to("meta")
    assert not lean_llama.supports(off_cpu)


@pytest.mark.parametrize(
    ("device", "distributed", "expected"),
    [("cpu", "NO", True), ("cpu", "MULTI_CPU", True), ("cuda", "NO", False), ("cuda", "MULTI_GPU", False),
     ("cpu", "FSDP", False), ("xpu", "NO", False)],
)  # fmt: skip
def test_stages_choose_the_lean_forward_only_where_training_runs_on_the_cpu(
    device, distributed, expected
) -> None:
    """The stages ask `lean_forward` while the model is still on the CPU: where the accelerator will put it
    decides, so a GPU (or any other device) gets the model's own forward and attention kernels."""
    model = build_causal_lm(ARCH, train_bpe_tokenizer(["a b c"] * 10, vocab_size=270))
    accelerator = SimpleNamespace(device=torch.device(device), distributed_type=DistributedType[distributed])
    cfg = SFTConfig(out_dir="unused", model="unused", train_file="unused")
    assert lean_forward(model, accelerator, cfg) is expected  # type: ignore[arg-type]
