from pathlib import Path

import pytest

from rlhf.config import PPOConfig, dump_config, load_config
from rlhf.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides_are_typed(tmp_path: Path) -> None:
    path = write(tmp_path, "sft:\n  lr: 1.0e-4\n  epochs: 3\npretrain:\n  arch:\n    hidden_size: 64\n")
    cfg = load_config(path, ["sft.lr=3e-4", "pretrain.arch.num_hidden_layers=2", "sft.eval_file=x.jsonl"])
    assert cfg.sft.lr == pytest.approx(3e-4)
    assert cfg.sft.epochs == 3
    assert cfg.pretrain.arch.hidden_size == 64 and cfg.pretrain.arch.num_hidden_layers == 2
    assert cfg.sft.eval_file == "x.jsonl"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sft.lrr=1"], "sft.lrr: unknown key (did you mean lr?)"),
        (["ppo.kl_coeff=0.1"], "ppo.kl_coeff: unknown key (did you mean kl_coef?)"),
        (
            ["sft.lora_r=8"],
            "sft.lora_r: unknown key (did you mean lora.r?)",
        ),  # a section's setting, written flat
        (
            ["pretrain.arch_hidden_size=8"],
            "pretrain.arch_hidden_size: unknown key (did you mean arch.hidden_size?)",
        ),
        (["sft.zzz=1"], "sft.zzz: unknown key"),
        (["sft.lr=-1"], "sft.lr: Input should be greater than 0"),
        (["sft.epochs=two"], "sft.epochs: Input should be a valid integer"),
        (
            ["sft.batch_size=10", "sft.micro_batch_size=4"],
            "batch_size (10) must be divisible by micro_batch_size (4)",
        ),
        (["pretrain.precision=fp8"], "pretrain.precision: Input should be 'auto', 'bf16' or 'fp32'"),
        (["nosuchstage.lr=1"], "nosuchstage: unknown key"),
        (["cai.prompts_files=[]"], "cai.prompts_files: List should have at least 1 item"),
        (
            ["dpo.loss=ipo", "dpo.label_smoothing=0.1"],
            "dpo: label_smoothing applies to the sigmoid and simpo losses",
        ),
        (
            ["pretrain.arch.hidden_size=100", "pretrain.arch.num_attention_heads=3"],
            "hidden_size must be divisible",
        ),
        (["ppo.safety_reward_model=rm"], "safety_reward_model needs safety_prompts or safety_threshold"),
        (["ppo.safety_threshold=0"], "safety_prompts and safety_threshold need safety_reward_model"),
        (
            ["ppo.safety_reward_model=rm", "ppo.safety_prompts=['(poison']"],
            "safety_prompts.0: '(poison' is not a regular expression",
        ),
        (["dpo.loss=simpo", "dpo.reference=runs/sft/final"], "dpo: loss simpo has no reference model"),
        (["dpo.loss=orpo", "dpo.reference=runs/sft/final"], "dpo: loss orpo has no reference model"),
        (
            ["dpo.loss=orpo", "dpo.label_smoothing=0.1"],
            "dpo: label_smoothing applies to the sigmoid and simpo losses, not orpo",
        ),
        # YAML's booleans: the judge would read the tokens "True" and "False"
        (["eval.judge_review_choices=[yes,no]"], "eval.judge_review_choices: YAML reads unquoted yes/no"),
        (
            ["redteam.classifier_review_choices=[Yes,No]"],
            "redteam.classifier_review_choices: YAML reads unquoted",
        ),
    ],
)
def test_bad_values_name_the_key_in_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_text_with_a_colon_is_text_and_braces_make_a_mapping() -> None:
    """YAML reads `Better:` as a mapping: a judge's template or principle set on the command line stays text."""
    template = "Question {prompt} A:{first} B:{second} Better:"
    cfg = load_config(None, [f"eval.judge_template={template}", "eval.judge_principle=Rule: be honest",
                             "ppo.lora={r: 4, alpha: 8}"])  # fmt: skip
    assert cfg.eval.judge_template == template and cfg.eval.judge_principle == "Rule: be honest"
    assert (cfg.ppo.lora.r, cfg.ppo.lora.alpha) == (4, 8)


def test_simpo_takes_its_papers_beta_unless_one_is_set() -> None:
    assert load_config(None, ["dpo.loss=simpo"]).dpo.beta == 2.0
    assert load_config(None, ["dpo.loss=simpo", "dpo.beta=0.5"]).dpo.beta == 0.5
    assert load_config(None, ["dpo.loss=sigmoid"]).dpo.beta == 0.1


def test_quoted_yes_and_no_are_judge_choices() -> None:
    cfg = load_config(None, ["eval.judge_review_choices=['yes','no']", "eval.judge_choices=[1,2]"])
    assert cfg.eval.judge_review_choices == ("yes", "no") and cfg.eval.judge_choices == ("1", "2")


def test_unknown_key_in_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pretrain\.arch\.depth: unknown key"):
        load_config(write(tmp_path, "pretrain:\n  arch:\n    depth: 3\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "sft: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["sft.lr"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["sft.lr=2e-4"])
    dumped = dump_config(cfg)
    again = load_config(write(tmp_path, dumped))
    assert again == cfg


def test_a_runs_own_config_is_read_as_its_stage(tmp_path: Path) -> None:
    """A run's config.yaml holds its stage's settings without the section's name: `-c` of that stage reads it
    as that section (so a run can be repeated or resumed from it); another command is told in one line what the
    file is, where it listed each of the stage's keys as unknown to it. A section named with nothing under it
    takes its defaults."""
    run_config = write(tmp_path, dump_config(load_config(None, ["ppo.lr=3e-6", "ppo.out_dir=runs/x"]).ppo))
    cfg = load_config(run_config, ["ppo.kl_coef=0.2"], section="ppo")
    assert (cfg.ppo.lr, cfg.ppo.out_dir, cfg.ppo.kl_coef) == (3e-6, "runs/x", 0.2)
    told = f"^{run_config}: holds one ppo stage's settings without the section name above them"
    with pytest.raises(ConfigError, match=told):
        load_config(run_config, section="sft")
    with pytest.raises(ConfigError, match=told):
        load_config(run_config)
    empty = tmp_path / "empty_section.yaml"
    empty.write_text("eval:\n")
    assert load_config(empty, ["eval.n_prompts=3"]).eval.n_prompts == 3


def test_ppo_help_counts_iterations_where_ppo_does() -> None:
    """PPO's loop counts max_steps, log_every and save_every in iterations (each several optimiser steps)."""
    for name in ("max_steps", "log_every", "save_every"):
        description = PPOConfig.model_fields[name].description or ""
        assert "iterations" in description and "steps" not in description, (name, description)


def test_lora_target_modules_without_a_rank_are_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """LoRA is off at rank 0: target modules set without a rank would otherwise train every weight unsaid."""
    with caplog.at_level("WARNING", logger="rlhf.config.base"):
        load_config(None, ["sft.lora.target_modules=[q_proj]"])
    assert "lora.target_modules is set but lora.r is 0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf.config.base"):
        load_config(None, ["sft.lora.target_modules=[q_proj]", "sft.lora.r=8"])
    assert caplog.text == ""


def test_best_of_n_at_temperature_0_is_refused() -> None:
    """All n answers were the one greedy answer, and the summary still gave a KL bound for picking among n."""
    with pytest.raises(ConfigError, match=r"temperature 0 samples the one greedy answer n times"):
        load_config(None, ["bon.temperature=0", "bon.n=4"])
    with pytest.raises(ConfigError, match=r"greedy answer best_of_n times"):
        load_config(None, ["eval.temperature=0", "eval.best_of_n=4", "eval.reward_model=rm"])
    assert load_config(None, ["bon.temperature=0", "bon.n=1"]).bon.n == 1


def test_a_path_setting_is_taken_as_written() -> None:
    """`--out 2024` was a config error (an int), `--out yes` a bool, `--out 'runs/exp #2'` wrote to runs/exp (YAML
    read ` #2` as a comment), and `--set sft.model=123` was refused: a text setting takes an unquoted value as
    written, a quoted one as YAML's string, and `null` where it may be unset."""
    from rlhf.cli.common import stage_config

    for out in ("2024", "2024-01-01", "yes", "null", "runs/exp #2", "'q'", "|", "dir: x"):
        assert stage_config(None, None, "sft", out).sft.out_dir == out
    cfg = load_config(None, ["sft.model=123", "sft.train_file=data/a #1.jsonl", "eval.reference=null",
                             "ppo.policy='quoted'", "sft.lr=1e-3", "eval.judge_model=~"])  # fmt: skip
    assert (cfg.sft.model, cfg.sft.train_file, cfg.eval.reference) == ("123", "data/a #1.jsonl", None)
    assert cfg.ppo.policy == "quoted" and cfg.sft.lr == 1e-3 and cfg.eval.judge_model is None


def test_a_runs_own_config_with_a_mistyped_key_names_that_key(tmp_path: Path) -> None:
    """A run's config.yaml with one key mistyped was read as a whole config: every one of its keys unknown."""
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(load_config(None, []).pretrain).replace("\nlr:", "\nlrr:"))
    with pytest.raises(ConfigError) as e:
        load_config(path, [], "pretrain")
    assert str(e.value) == "config error: pretrain.lrr: unknown key (did you mean lr?)"


def test_a_runs_own_config_with_a_key_mistyped_as_a_sections_name_names_that_key(tmp_path: Path) -> None:
    """`reward:` for `reward_model:` in a PPO run's config.yaml made the file read as a config of sections: every
    other key unknown. A config of sections alone is still read as one, even by a stage with a setting of
    that name (the loop's `ppo`)."""
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(load_config(None, []).ppo).replace("\nreward_model:", "\nreward:"))
    with pytest.raises(ConfigError) as e:
        load_config(path, [], "ppo")
    assert str(e.value) == "config error: ppo.reward: unknown key (did you mean reward_model?)"
    path.write_text("ppo:\n  lr: 0.5\n")
    assert load_config(path, [], "loop").ppo.lr == 0.5
