"""`rlhf reward` end to end on tiny models: the issue's acceptance check (reward model vs gold >= labelers vs
gold), normalisation, a plain Hugging Face checkpoint, resume equality (full and LoRA), CLI errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import NormaliseSettings, PanelConfig, RewardConfig
from rlhf.data.jsonl import write_jsonl
from rlhf.data.preferences import write_preferences
from rlhf.errors import RlhfError
from rlhf.eval.reward_eval import add_gold_eval
from rlhf.labelers.panel import Panel, label_offline
from rlhf.models.heads import load_scalar_model, sequence_rewards
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.runs import abandon_unstarted_runs, read_metrics
from rlhf.stages import reward
from rlhf.stages.reward import read_groups, reference_sequences
from tests.archs import save_tiny
from tests.cli import run_cli


def padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask)."""
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


def reference_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    write_jsonl(
        path, [{"prompt": r["prompt"], "completion": c["text"]} for r in rows for c in r["completions"]]
    )
    return path


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tiny_sft_model: Path, demo_candidates: list[dict[str, Any]]
) -> RewardConfig:
    """A reward model trained on 3,600 panel votes (600 prompts x C(4,2)), normalised on reference answers."""
    root = tmp_path_factory.mktemp("reward")
    write_preferences(root / "votes.jsonl", label_offline(demo_candidates, Panel.from_config(PanelConfig())))
    normalise = NormaliseSettings(
        completions_file=str(reference_file(root / "ref.jsonl", demo_candidates[:12])), scale=True
    )
    cfg = RewardConfig(out_dir=str(root / "rm"), model=str(tiny_sft_model), train_file=str(root / "votes.jsonl"),
                       lr=2e-3, epochs=2, eval_fraction=0.2, max_seq_len=96, log_every=10, eval_every=1000,
                       save_every=1000, normalise=normalise)  # fmt: skip
    reward.run(cfg, quiet=True)
    return cfg


def test_reward_model_agrees_with_gold_more_than_its_labelers(trained: RewardConfig) -> None:
    gold = add_gold_eval(trained.out_dir, [trained.train_file])
    assert gold["gold/pairs"] > 500
    assert 0.65 <= gold["gold/label_agreement"]["accuracy"] <= 0.82
    assert gold["gold/rm_accuracy"]["accuracy"] >= gold["gold/label_agreement"]["accuracy"]
    report = json.loads((Path(trained.out_dir) / "eval.json").read_text())
    assert report["gold/rm_accuracy"] == gold["gold/rm_accuracy"]
    assert 0.6 < report["rm/accuracy"]["accuracy"] < 0.9  # against the noisy labels themselves
    assert set(report["rm/by_labeler"]) == {f"sim-{i}" for i in range(5)}
    assert 0.0 <= report["rm/calibration"]["ece"] < 0.2
    assert (Path(trained.out_dir) / "reward_eval.png").stat().st_size > 5000
    losses = [
        row["rm/loss"] for row in read_metrics(Path(trained.out_dir) / "metrics.jsonl") if "rm/loss" in row
    ]
    assert losses[-1] < losses[0] < 0.70  # starts near log 2 = 0.693, then learns


def test_normalisation_gives_reference_answers_mean_0_std_1(
    trained: RewardConfig, tiny_sft_model: Path
) -> None:
    assert trained.normalise.completions_file is not None
    tokenizer = load_tokenizer(str(tiny_sft_model))
    rows = [json.loads(line) for line in Path(trained.normalise.completions_file).read_text().splitlines()]
    sequences = [
        tokenizer(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"][-95:]
        + [tokenizer.eos_token_id]
        for r in rows
    ]
    model = load_scalar_model(str(Path(trained.out_dir) / "final"))
    ids, mask = padded(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        normalised = sequence_rewards(model, ids, mask)
        raw = sequence_rewards(model, ids, mask, normalise=False)
    assert len(rows) == 48
    assert abs(float(normalised.mean())) < 1e-4
    assert float(normalised.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert float(raw.std()) > 0.05 and abs(float(raw.mean())) > 1e-3  # the constants did real work


def test_final_checkpoint_is_a_plain_hf_model_scoring_like_ours(
    trained: RewardConfig, tiny_sft_model: Path
) -> None:
    final = Path(trained.out_dir) / "final"
    assert not (final / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert type(plain).__name__ == "LlamaForSequenceClassification" and plain.config.num_labels == 1
    tokenizer = load_tokenizer(str(final))
    texts = [
        "User: Hi!\nAssistant: Hello!",
        "User: What is 2 plus 2?\nAssistant: Ugh, you fool. 2 plus 2 is 4. Ok.",
    ]
    ids, mask = padded([tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts],
                       tokenizer.pad_token_id)  # fmt: skip
    ours = load_scalar_model(str(final))
    with torch.no_grad():
        theirs = plain(input_ids=ids, attention_mask=mask).logits[:, 0]  # HF pools at the last non-PAD token
        mine = sequence_rewards(ours, ids, mask, normalise=False)
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=0)
    assert mine[0] > mine[1]  # the rude answer scores lower


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_gives_the_same_losses_as_uninterrupted(
    tmp_path: Path, tiny_sft_model: Path, demo_candidates: list[dict[str, Any]], lora_rank: int
) -> None:
    write_preferences(
        tmp_path / "votes.jsonl", label_offline(demo_candidates[:80], Panel.from_config(PanelConfig()))
    )
    cfg = RewardConfig(out_dir=str(tmp_path / "a"), model=str(tiny_sft_model), train_file=str(tmp_path / "votes.jsonl"),
                       lr=3e-3, batch_size=8, micro_batch_size=4, max_steps=6, warmup_steps=2, save_every=3,
                       eval_every=3, log_every=1, keep_checkpoints=3, max_seq_len=96,
                       normalise=NormaliseSettings(enabled=False))  # fmt: skip
    cfg.lora.r = lora_rank
    reward.run(cfg, quiet=True)
    # "kill" the run after step 3: drop the later checkpoint and the final model, then resume
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000006")
    shutil.rmtree(tmp_path / "b" / "final")
    reward.run(cfg.model_copy(update={"out_dir": str(tmp_path / "b")}), resume=True, quiet=True)

    def curve(run: str) -> list[tuple[int, float]]:
        rows = read_metrics(tmp_path / run / "metrics.jsonl")
        return [
            (r["step"], r[k]) for r in rows for k in ("rm/loss", "rm/grad_norm", "rm/eval_loss") if k in r
        ]

    assert len(curve("a")) == 6 + 6 + 2
    assert [s for s, _ in curve("b")] == [s for s, _ in curve("a")]
    assert [v for _, v in curve("b")] == pytest.approx([v for _, v in curve("a")], abs=1e-6)
    final_a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a" / "final")
    final_b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b" / "final")
    for (name, pa), pb in zip(final_a.state_dict().items(), final_b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)
    sft_embeddings = load_causal_lm(str(tiny_sft_model)).get_input_embeddings().weight
    changed = not torch.equal(final_a.get_input_embeddings().weight, sft_embeddings)
    assert changed == (lora_rank == 0)  # LoRA trains adapters only (the embeddings stay), merged on save
    # killed after the last checkpoint (while normalising or saving): the result reports the last step's metrics
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "final")
    resumed = reward.run(cfg.model_copy(update={"out_dir": str(tmp_path / "c")}), resume=True, quiet=True)
    summary_a = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert {k: resumed[k] for k in ("rm/loss", "rm/eval_loss", "rm/eval_accuracy")} == pytest.approx(
        {k: summary_a[k] for k in ("rm/loss", "rm/eval_loss", "rm/eval_accuracy")}
    )


def test_lora_reward_model_on_gpt2_adapts_its_linear_layers(
    tmp_path: Path, tiny_sft_model: Path, demo_candidates: list[dict[str, Any]]
) -> None:
    """The default target modules name no architecture: GPT-2's fused Conv1D projections get adapters too."""
    tokenizer = load_tokenizer(str(tiny_sft_model))
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    write_preferences(
        tmp_path / "votes.jsonl", label_offline(demo_candidates[:16], Panel.from_config(PanelConfig()))
    )
    cfg = RewardConfig(out_dir=str(tmp_path / "rm"), model=str(base), train_file=str(tmp_path / "votes.jsonl"),
                       lr=1e-2, batch_size=4, micro_batch_size=4, max_steps=2, warmup_steps=0, eval_fraction=0,
                       max_seq_len=64, normalise=NormaliseSettings(enabled=False))  # fmt: skip
    cfg.lora.r = 4
    reward.run(cfg, quiet=True)
    before = load_causal_lm(str(base)).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final").state_dict()
    assert not torch.equal(
        after["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"]
    )
    assert not torch.equal(
        after["transformer.h.1.mlp.c_fc.weight"], before["transformer.h.1.mlp.c_fc.weight"]
    )
    assert torch.equal(after["transformer.wte.weight"], before["transformer.wte.weight"])  # adapters only


def test_cli_trains_normalises_on_sft_samples_and_prints_gold_numbers(
    tmp_path: Path, tiny_sft_model: Path, demo_candidates: list[dict[str, Any]]
) -> None:
    write_preferences(
        tmp_path / "votes.jsonl", label_offline(demo_candidates[:60], Panel.from_config(PanelConfig()))
    )
    out = tmp_path / "rm"
    sets = [f"reward.model={tiny_sft_model}", f"reward.train_file={tmp_path / 'votes.jsonl'}", "reward.max_steps=2",
            "reward.batch_size=8", "reward.micro_batch_size=8", "reward.gold_eval=true", "reward.normalise.n_prompts=16",
            "reward.normalise.max_new_tokens=16", "reward.eval_fraction=0.2"]  # fmt: skip
    result = CliRunner().invoke(
        app, ["reward", "-q", "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    )
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output
    assert "reward model" in result.output and "labels (panel)" in result.output
    assert "gold/rm_accuracy" in json.loads((out / "eval.json").read_text())
    # normalised on the SFT policy's own samples: re-draw them (seeded) and they score mean 0
    cfg = RewardConfig(model=str(tiny_sft_model), train_file=str(tmp_path / "votes.jsonl"),
                       normalise=NormaliseSettings(n_prompts=16, max_new_tokens=16))  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_sft_model))
    prompts = [g.prompt for g in read_groups(cfg.train_file, cfg, tokenizer)]
    sequences = reference_sequences(cfg, tokenizer, prompts, cfg.max_seq_len)
    model = load_scalar_model(str(out / "final"))
    with torch.no_grad():
        rewards = sequence_rewards(model, *padded(sequences, tokenizer.pad_token_id))
    assert len(sequences) == 16 and abs(float(rewards.mean())) < 1e-4
    assert json.loads((out / "summary.json").read_text())["reference_n"] == 16


def test_malformed_preference_row_is_one_line_with_file_and_line(
    tmp_path: Path, tiny_sft_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"prompt": "User: Hi!\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}
    lines = [json.dumps(good), json.dumps(good), json.dumps({"prompt": "q", "chosen": 5, "rejected": "x"})]
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("reward", "--out", str(tmp_path / "rm"), "--set", f"reward.model={tiny_sft_model}",
                   "--set", f"reward.train_file={tmp_path / 'prefs.jsonl'}")  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'prefs.jsonl'}:3: field 'chosen' should be str, got int"]
    assert not (tmp_path / "rm").exists()  # nothing written before the data was read
    # asked to, the stage skips the bad row (and says so) and trains on the rest
    with caplog.at_level("WARNING", logger="rlhf.data.preference_io"):
        proc = run_cli("reward", "--quiet", "--out", str(tmp_path / "rm"), "--set", f"reward.model={tiny_sft_model}",
                       "--set", f"reward.train_file={tmp_path / 'prefs.jsonl'}", "--set", "reward.skip_bad_rows=true",
                       "--set", "reward.eval_fraction=0", "--set", "reward.normalise.enabled=false",
                       "--set", "reward.batch_size=2", "--set", "reward.micro_batch_size=2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert any("skipped 1 malformed rows" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "rm" / "final" / "model.safetensors").exists()


def test_warm_start_continues_from_the_given_reward_model(trained: RewardConfig, tmp_path: Path) -> None:
    """`init_from`: training starts from that model's weights and head, not a new head on the SFT policy."""
    previous = load_scalar_model(str(Path(trained.out_dir) / "final"))
    cfg = trained.model_copy(update={"out_dir": str(tmp_path / "warm"), "init_from": str(Path(trained.out_dir) / "final"),
                                     "lr": 1e-9, "max_steps": 1, "eval_fraction": 0.0})  # fmt: skip
    cfg.normalise.enabled = False
    reward.run(cfg, quiet=True)
    warm = load_scalar_model(str(tmp_path / "warm" / "final"))
    cold_cfg = cfg.model_copy(update={"out_dir": str(tmp_path / "cold"), "init_from": None})
    reward.run(cold_cfg, quiet=True)
    cold = load_scalar_model(str(tmp_path / "cold" / "final"))
    assert torch.allclose(warm.score.weight, previous.score.weight, atol=1e-6)
    assert not torch.allclose(cold.score.weight, previous.score.weight, atol=1e-2)
    # not normalised again, the warm start keeps the constants it came with, and its report says so
    kept = {"shift": previous.config.rlhf_reward_shift, "scale": previous.config.rlhf_reward_scale}
    assert kept["shift"] != 0.0 and kept["scale"] != 1.0
    assert (warm.config.rlhf_reward_shift, warm.config.rlhf_reward_scale) == (kept["shift"], kept["scale"])
    assert json.loads((tmp_path / "warm" / "eval.json").read_text())["rm/normalisation"] == kept


def test_warm_start_from_a_policy_is_refused(trained: RewardConfig, tmp_path: Path) -> None:
    """`init_from` names a reward model; the SFT policy there would get a new random head, not a warm start."""
    cfg = trained.model_copy(
        update={"out_dir": str(tmp_path / "warm"), "init_from": trained.model, "max_steps": 1}
    )
    with pytest.raises(
        RlhfError, match=r"is not a reward model \(\w+ForCausalLM\): train one with `rlhf reward`"
    ):
        reward.run(cfg, quiet=True)
    abandon_unstarted_runs()  # as the `rlhf` command does after an error: no run directory is left
    assert not (tmp_path / "warm").exists()


def test_warm_start_from_a_reward_model_of_another_tokenizer_is_refused(
    trained: RewardConfig, tmp_path: Path
) -> None:
    """Its embeddings would read the ids of reward.model's tokenizer, and the run would save it with that one."""
    other = save_tiny("gpt2", tmp_path / "gpt2")
    AutoModelForSequenceClassification.from_pretrained(other, num_labels=1).save_pretrained(
        tmp_path / "gpt2_rm"
    )
    load_tokenizer(str(other)).save_pretrained(tmp_path / "gpt2_rm")
    cfg = trained.model_copy(
        update={"out_dir": str(tmp_path / "warm"), "init_from": str(tmp_path / "gpt2_rm"), "max_steps": 1}
    )
    with pytest.raises(RlhfError, match=r"^reward.model and reward.init_from use different tokenizers: "):
        reward.run(cfg, quiet=True)
    assert not (tmp_path / "warm").exists()


def test_prompts_with_nothing_to_answer_from_are_refused_before_training(
    trained: RewardConfig, tmp_path: Path
) -> None:
    """With no BOS token an empty prompt has no token to sample an answer from: the normalisation ended in a
    reshape error after training, with no final model. Now it is refused before any work, and among other
    prompts an empty one is left out of the normalisation's samples."""
    assert load_tokenizer(trained.model)("")["input_ids"] == []  # the tiny tokenizer has no BOS
    write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "", "chosen": "a", "rejected": "b"}])
    cfg = trained.model_copy(update={"out_dir": str(tmp_path / "rm"), "train_file": str(tmp_path / "empty.jsonl"),
                                     "eval_fraction": 0.0, "normalise": NormaliseSettings(n_prompts=4)})  # fmt: skip
    with pytest.raises(
        RlhfError, match=r"empty.jsonl: every prompt is empty, so the policy has nothing to answer"
    ):
        reward.run(cfg, quiet=True)
    abandon_unstarted_runs()
    assert not (tmp_path / "rm").exists()
    sequences = reference_sequences(cfg, load_tokenizer(trained.model), ["", "User: Hi\nAssistant:"], 64)
    assert len(sequences) == 1
    # votes that compare nothing (ties) are that, not prompts without a token
    ties = [
        {"prompt": "User: Hi\nAssistant:", "completion_a": " Hi", "completion_b": " Hey", "choice": "tie"}
    ]
    write_jsonl(tmp_path / "ties.jsonl", ties)
    with pytest.raises(RlhfError, match=r"ties.jsonl: no comparisons to train on"):
        reward.run(cfg.model_copy(update={"train_file": str(tmp_path / "ties.jsonl")}), quiet=True)
    abandon_unstarted_runs()


def test_a_context_too_short_for_the_normalisation_is_refused_before_training(
    trained: RewardConfig, tmp_path: Path, demo_data: Path
) -> None:
    """In a 32-token context the normalisation's 48-token answers ended the run after training, with no final
    model, naming `max_new_tokens` of no stage; SFT's own sample answers ended its run the same way."""
    from rlhf.config import SFTConfig
    from rlhf.stages import sft

    tokenizer = load_tokenizer(trained.model)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    sft.run(SFTConfig(out_dir=str(tmp_path / "sft"), model=str(tmp_path / "gpt2"), max_seq_len=32, max_steps=2,
                      train_file=str(demo_data / "sft.jsonl"), batch_size=8, micro_batch_size=8,
                      eval_fraction=0.1, precision="fp32"), quiet=True)  # fmt: skip
    samples = [json.loads(line) for line in (tmp_path / "sft" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(isinstance(s["response"], str) for s in samples)
    cfg = trained.model_copy(update={"out_dir": str(tmp_path / "rm"), "model": str(tmp_path / "sft" / "final"),
                                     "max_seq_len": 32, "normalise": NormaliseSettings()})  # fmt: skip
    with pytest.raises(RlhfError, match=r"^reward.normalise.max_new_tokens \(48\) leaves no room for a prompt in "
                                        r"the model's context of 32 tokens"):  # fmt: skip
        reward.run(cfg, quiet=True)
    abandon_unstarted_runs()
    assert not (tmp_path / "rm").exists()
