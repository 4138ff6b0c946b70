"""rlhf.models.lora: LoRA on every linear layer and on the routed experts of a mixture of experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from rlhf.config import DPOConfig, LoraSettings, PPOConfig
from rlhf.errors import ConfigError
from rlhf.models.lora import add_lora, expert_parameters


def tiny_moe() -> Qwen2MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=64)  # fmt: skip
    return Qwen2MoeForCausalLM(config)


def test_routed_experts_get_adapters_that_train_and_merge() -> None:
    model = tiny_moe()
    assert expert_parameters(model) == ["experts.down_proj", "experts.gate_up_proj"]
    x = torch.randint(0, 100, (2, 8))
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8), "CAUSAL_LM")
    expert_lora = {n: p for n, p in peft_model.named_parameters() if "experts" in n and "lora_" in n}
    assert len(expert_lora) == 2 * 2 * 2  # 2 layers x 2 expert weights x (A, B)
    assert all(p.requires_grad for p in expert_lora.values())
    with torch.no_grad():  # B starts at 0 (a no-op adapter): give the experts' adapters weights that matter
        for name, p in expert_lora.items():
            if "lora_B" in name:
                p.normal_()
    logits = peft_model(x).logits
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_lora.values())
    merged = peft_model.merge_and_unload()
    assert torch.allclose(merged(x).logits, logits, atol=1e-4)


def test_a_dense_model_has_no_expert_parameters() -> None:
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    assert expert_parameters(model) == []
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8), "CAUSAL_LM")
    assert any("q_proj.lora_A" in n for n, _ in peft_model.named_parameters())


def test_a_target_module_the_model_lacks_is_a_config_error() -> None:
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"\['v_prj'\] match no module of LlamaForCausalLM .*q_proj, up_proj, v_proj"
    ):
        add_lora(
            LlamaForCausalLM(config),
            LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_prj"]),
            "CAUSAL_LM",
        )
    # GPT-2's projections are transformers' Conv1D layers, not Linear ones: named all the same
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ConfigError, match=r"its linear layers: c_attn, c_fc, c_proj, lm_head\)"):
        add_lora(gpt2, LoraSettings(r=4, target_modules=["q_proj"]), "CAUSAL_LM")
    # a name or a dotted suffix of one is a match
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "self_attn.v_proj"])
    peft_model = add_lora(LlamaForCausalLM(config), lora, "CAUSAL_LM")
    adapted = {n.split(".")[-4] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("section", [PPOConfig, DPOConfig])
def test_the_flat_keys_of_earlier_configs_read_as_the_lora_section(section: type) -> None:
    """`lora_r` and `lora_alpha`, as PPO and DPO configs wrote them before every stage took a `lora` section."""
    cfg = section(lora_r=8, lora_alpha=32)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 32, "all-linear")
    assert section(lora={"r": 4}).lora.alpha == 16
    assert section(lora_r=4, lora={"target_modules": ["q_proj"]}).lora.target_modules == ["q_proj"]
    assert "lora_r" not in section(lora_r=4).model_dump()


def test_adapters_of_a_model_named_by_a_relative_folder_name_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter checkpoint names its base model: a folder given relative to where training ran would not
    be found by `rlhf serve` started elsewhere."""
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    model = LlamaForCausalLM.from_pretrained("models/base")
    add_lora(model, LoraSettings(r=4), "CAUSAL_LM").save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "models" / "base")
