"""LoRA adapters on any Hugging Face model: every linear layer, and the routed experts of a mixture of experts.

Mixtures of experts (Qwen2-MoE, Mixtral, DeepSeek-style) keep their experts as 3-D parameters (experts, out,
in) rather than Linear layers, so `target_modules="all-linear"` would adapt the attention, the router and the
shared expert but leave the routed experts frozen. PEFT adapts such parameters through `target_parameters`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from rlhf.config import LoraSettings
from rlhf.errors import ConfigError
from rlhf.models.loading import disable_dropout, load_causal_lm


def expert_parameters(model: torch.nn.Module) -> list[str]:
    """`module.parameter` suffixes of the 3-D weights of `model` (routed experts), as PEFT's
    `target_parameters` names them."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                names.add(f"{module_name.rsplit('.', 1)[-1]}.{name}")
    return sorted(names)


def add_lora(
    model: torch.nn.Module, lora: LoraSettings, task_type: str, modules_to_save: list[str] | None = None
) -> Any:
    """`model` wrapped by peft with LoRA adapters (rank `lora.r`, dropout 0) on `lora.target_modules` and, with
    "all-linear", on the routed experts too. A listed name that matches no module is a ConfigError (peft adapts
    the others and ignores it)."""
    target_modules = lora.target_modules
    if isinstance(target_modules, list):  # a string is "all-linear" or a regular expression
        names = [name for name, _ in model.named_modules()]
        unknown = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unknown:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear | Conv1D)})  # fmt: skip
            raise ConfigError(f"LoRA target_modules {unknown} match no module of {type(model).__name__} (its "
                              f"linear layers: {', '.join(linear)})")  # fmt: skip
    experts = expert_parameters(model) if target_modules == "all-linear" else []
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, task_type=task_type, target_modules=target_modules,
        target_parameters=experts or None, modules_to_save=modules_to_save,
    )  # fmt: skip
    peft_model = get_peft_model(model, config)  # type: ignore[arg-type]
    # the base model's path goes into every adapter checkpoint: a local folder named as the stage was given it
    # (relative to where it ran) would not be found from anywhere else, so it is written whole
    base = peft_model.peft_config["default"].base_model_name_or_path
    if base and Path(base).expanduser().is_dir():
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(base).expanduser().resolve())
    return peft_model


def trainable_causal_lm(
    start: str, saved: Path | None, lora: LoraSettings, tokenizer: PreTrainedTokenizerBase
) -> Any:
    """The causal LM a stage trains: `saved` (a checkpoint's model folder, to resume), else `start`; with `lora.r`,
    adapters on the frozen `start` model, a LoRA checkpoint holding the adapters alone. Dropout off."""
    model: Any = load_causal_lm(
        str(saved) if saved is not None and lora.r == 0 else start, tokenizer=tokenizer
    )
    if lora.r > 0:
        model = (
            PeftModel.from_pretrained(model, str(saved), is_trainable=True)
            if saved is not None
            else add_lora(model, lora, "CAUSAL_LM")
        )
    disable_dropout(model)
    return model
