"""What the `rlhf` command's modules share: the app and its `data` group, the options every stage takes, the
settings listed in --help, logging, and reading a stage's config."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from rlhf.config import RootConfig, load_config, text_override
from rlhf.feedback.cli import app as label_app


def settings_help(section: str, also: tuple[str, str] | None = None) -> str:
    """A stage's --help epilog: every setting of its config section, with its default and what it does; `also`:
    (another section, the prefix of its keys the stage reads too), e.g. the judge settings of eval."""
    from rich.markup import escape

    def described(model: type[BaseModel], prefix: str = "", keep: str = "") -> list[str]:
        """Each field of `model` whose name starts with `keep`; a nested section as its own fields, dotted."""
        lines = []
        for name, field in model.model_fields.items():
            if not name.startswith(keep):
                continue
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):  # lora, arch, normalise
                lines.append(f"[bold]{prefix}{name}[/bold].KEY: {escape(field.description or '')}")
                lines += described(annotation, f"{prefix}{name}.")
            else:
                default = escape(repr(field.get_default(call_default_factory=True)))
                lines.append(f"[bold]{prefix}{name}[/bold] = {default}: {escape(field.description or '')}")
        return lines

    def listed(part: str, keep: str = "") -> list[str]:
        return described(RootConfig.model_fields[part].annotation, keep=keep)  # type: ignore[arg-type]

    lines = [
        f"[bold]Settings[/bold]: the {section}: section of a config file (-c), or --set {section}.KEY=VALUE",
        *listed(section),
    ]
    if also is not None:
        other, prefix = also
        lines += [
            f"[bold]Also read[/bold]: from the {other}: section, --set {other}.KEY=VALUE",
            *listed(other, prefix),
        ]
    return "\n\n".join(lines)


app = typer.Typer(
    help="rlhf-loop: pretrain, SFT, collect human feedback, train a reward model, PPO with KL, serve, iterate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate or convert data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(label_app, name="label", help="The labeling web app and its feedback store.")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config with one section per stage")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a config key, e.g. --set sft.lr=3e-4 (repeatable)")
]
OutOpt = Annotated[str | None, typer.Option("--out", help="run directory (default: the stage's out_dir)")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="continue from the run directory's last checkpoint")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="plain log lines instead of progress bars")]


def summary(line: str) -> None:
    """A training stage's closing line, printed once: by the main process where `accelerate launch` or torchrun
    started several (they set RANK)."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(line)


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def stage_config(config: Path | None, sets: list[str] | None, section: str, out: str | None) -> RootConfig:
    # Commands read their config before importing their stage (torch, transformers): a bad key or value is
    # reported at once, not after seconds of imports.
    overrides = list(sets or [])
    if out:
        overrides.append(text_override(f"{section}.out_dir", out))
    return load_config(config, overrides, section)
