"""A whole config file (RootConfig, one section per stage): read from YAML with dotted `--set` overrides and
validated, errors naming the dotted key (and the setting an unknown key resembles); a resolved section
written back as YAML."""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rlhf.config.base import DataConfig, Section, lift_flat_lora
from rlhf.config.generation import BonConfig, EvalConfig, GenerateConfig, PanelConfig
from rlhf.config.loop import LoopConfig
from rlhf.config.ppo import PPOConfig
from rlhf.config.preference import DPOConfig, RewardConfig
from rlhf.config.safety import CaiConfig, RedteamConfig
from rlhf.config.supervised import PretrainConfig, SFTConfig
from rlhf.errors import ConfigError, read_yaml


class RootConfig(Section):
    """A whole config file: one section per stage."""

    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    panel: PanelConfig = Field(default_factory=PanelConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    bon: BonConfig = Field(default_factory=BonConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    redteam: RedteamConfig = Field(default_factory=RedteamConfig)
    cai: CaiConfig = Field(default_factory=CaiConfig)

    def loop_ppo(self) -> PPOConfig:
        """The ppo section with the loop's own ppo settings (loop.ppo) laid over it; a nested section (lora) key
        by key, so that `loop.ppo: {lora: {r: 8}}` keeps the ppo section's alpha."""
        settings = self.ppo.model_dump()
        for key, value in lift_flat_lora(self.loop.ppo).items():
            nested = isinstance(value, dict) and isinstance(settings.get(key), dict)
            settings[key] = {**settings[key], **value} if nested else value
        return PPOConfig.model_validate(settings)

    @model_validator(mode="after")
    def _loop_ppo_is_ppo(self) -> RootConfig:
        unknown = sorted(set(lift_flat_lora(self.loop.ppo)) - set(PPOConfig.model_fields))
        if unknown:
            raise ValueError(f"loop.ppo: not ppo settings: {', '.join(unknown)}")
        self.loop_ppo()
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    """`sft.lr=3e-4` -> (["sft", "lr"], 0.0003); the value is parsed as YAML, but for text that YAML would read
    as a mapping without braces (`Better:`, `Rule: be honest`, a judge's template): that stays the text it is,
    and a mapping is written `{a: 1}`. A setting that is text (a path, a model name) takes an unquoted value as
    written (`--set sft.model=2024`, `--set sft.train_file=data/a #1.jsonl`), or `null` where it may be unset;
    a quoted one is YAML's string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. sft.lr=3e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: malformed key {key!r}")
    text = _text_setting(parts)
    if text is not None and not raw.lstrip().startswith(("'", '"')):
        if text and raw.strip() in ("null", "~", "Null", "NULL"):
            return parts, None
        return parts, raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw
    return parts, value


def text_override(key: str, value: str | Path) -> str:
    """A `--set` item giving the text setting `key` exactly this value (a run directory, a path), whatever YAML
    would make of it: quoted, as JSON's strings are YAML's."""
    return f"{key}={json.dumps(str(value), ensure_ascii=False)}"


def _section(path: Sequence[Any]) -> type[BaseModel] | None:
    """The config section (model) at dotted `path` from RootConfig, or None where a part is not a section."""
    model: type[BaseModel] = RootConfig
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _text_setting(parts: list[str]) -> bool | None:
    """For the dotted setting `parts` of RootConfig: None unless it is text alone (str, or str or None), else
    whether it may be None."""
    model = _section(parts[:-1])
    if model is None:
        return None
    field = model.model_fields.get(parts[-1])
    if field is None:
        return None
    kinds = set(typing.get_args(field.annotation)) if typing.get_origin(field.annotation) in (Union, UnionType) \
        else {field.annotation}  # fmt: skip
    if kinds == {str}:
        return False
    if kinds == {str, type(None)}:
        return True
    return None


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = tree
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts)}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def _resembles(loc: tuple[Any, ...]) -> str:
    """For an unknown key: " (did you mean KEY?)" with the setting of its section it is closest to, or ""."""
    model = _section(loc[:-1])
    if model is None:
        return ""
    key = str(loc[-1])
    for name, field in model.model_fields.items():  # lora_r for lora.r: a section's setting, written flat
        section = field.annotation
        if key.startswith(f"{name}_") and isinstance(section, type) and issubclass(section, BaseModel):
            inner = difflib.get_close_matches(key.removeprefix(f"{name}_"), list(section.model_fields), n=1)
            if inner:
                return f" (did you mean {name}.{inner[0]}?)"
    near = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean {near[0]}?)" if near else ""


def _format_error(e: ValidationError) -> str:
    msgs = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _resembles(tuple(err["loc"]))
        msgs.append(
            f"{key}: {msg}"
            + (
                f" (got {err['input']!r})"
                if err["type"] != "extra_forbidden" and not isinstance(err["input"], dict)
                else ""
            )
        )
    return "config error: " + "; ".join(msgs)


def stages_with(keys: set[str]) -> list[str]:
    """The config sections (stages) that have every one of these settings: whose settings a file of one
    stage's settings alone (a run's config.yaml) may be."""
    return [name for name, field in RootConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            and keys <= set(field.annotation.model_fields)]  # fmt: skip


def _mostly_of(section: str, keys: set[str]) -> bool:
    """Whether settings `keys` are mostly (four in five) `section`'s: a stage's config.yaml with a key mistyped."""
    model = _section([section])
    return model is not None and len(keys & set(model.model_fields)) >= 0.8 * len(keys)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, section: str | None = None
) -> RootConfig:
    """Read a YAML config (or the defaults), apply `--set` overrides, validate everything.

    `section`: the stage reading it. A file of that stage's settings alone, without the section's name above
    them (a run's own config.yaml, rlhf.runs), is read as that section, so a run can be repeated or resumed
    with `-c RUN/config.yaml`."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p, "config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        tree = loaded or {}
        if (
            section is not None
            and not set(tree) <= set(RootConfig.model_fields)
            and _mostly_of(section, set(tree))
        ):
            # a run's own config.yaml (mostly the section's settings, even where a mistyped key is a section's
            # name, `reward:` for `reward_model:`), with any key it does not know reported as that section's
            tree = {section: tree}
        elif tree and not set(tree) & set(RootConfig.model_fields):
            stages = stages_with(set(tree))
            if section in stages:
                tree = {section: tree}
            elif stages:
                raise ConfigError(
                    f"{p}: holds one {' or '.join(stages)} stage's settings without the section name above them (a "
                    f"run's config.yaml); only that stage reads such a file, other commands need sections "
                    f"(`{stages[0]}:` above its settings)"
                )
        # a section named with nothing under it (`eval:`) takes its defaults
        tree = {k: {} if v is None and k in RootConfig.model_fields else v for k, v in tree.items()}
    tree = apply_overrides(tree, overrides or [])
    try:
        return RootConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def dump_config(section: BaseModel) -> str:
    """The resolved config as YAML (written into each run directory)."""
    return yaml.safe_dump(section.model_dump(mode="json"), sort_keys=False)
