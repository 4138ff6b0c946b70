"""Typed configs, one per stage (pydantic v2), loaded from YAML with dotted `--set` overrides.

A config file holds one section per stage (`data`, `pretrain`, `sft`, `generate`, ...). Every field has a type,
a default and a one-line description that doubles as documentation. Errors name the dotted key.

Where each section lives: `base` (the Section base, a new model's architecture, the demo data, LoRA, what every
training stage shares), `supervised` (pretrain, sft), `preference` (reward, dpo), `ppo`, `generation`
(generate, panel, bon, eval), `loop`, `safety` (redteam, cai); `loading` holds RootConfig, the whole file,
and reads and writes it. Import them from here: `from rlhf.config import PPOConfig, load_config`.
"""

from rlhf.config.base import ArchConfig, DataConfig, LoraSettings, Precision, Section, Tracker, TrainConfig
from rlhf.config.generation import BonConfig, EvalConfig, GenerateConfig, PanelConfig
from rlhf.config.loading import (
    RootConfig,
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
    text_override,
)
from rlhf.config.loop import LoopConfig
from rlhf.config.ppo import PPOConfig
from rlhf.config.preference import (
    DPOConfig,
    NormaliseSettings,
    PreferenceTrainConfig,
    RewardConfig,
)
from rlhf.config.safety import CaiConfig, RedteamConfig
from rlhf.config.supervised import PretrainConfig, SFTConfig

__all__ = [
    "ArchConfig",
    "BonConfig",
    "CaiConfig",
    "DPOConfig",
    "DataConfig",
    "EvalConfig",
    "GenerateConfig",
    "LoopConfig",
    "LoraSettings",
    "NormaliseSettings",
    "PPOConfig",
    "PanelConfig",
    "Precision",
    "PreferenceTrainConfig",
    "PretrainConfig",
    "RedteamConfig",
    "RewardConfig",
    "RootConfig",
    "SFTConfig",
    "Section",
    "Tracker",
    "TrainConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_override",
    "text_override",
]
