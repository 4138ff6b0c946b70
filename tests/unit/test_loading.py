"""rlhf.models.loading and the reward-model loader: clear one-line errors for what users point stages at, and
tokenizers checked for equality where two models meet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.config import PPOConfig
from rlhf.errors import RlhfError
from rlhf.models.heads import load_reward_model
from rlhf.models.loading import check_same_tokenizer, disable_dropout, load_causal_lm, load_tokenizer
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.stages import ppo
from tests.archs import ALIBI, ARCHS, save_tiny


def other_tokenizer_dir(tmp_path: Path, vocab_size: int = 280) -> Path:
    corpus = [f"User: what is {a} plus {b}?\nAssistant: {a + b}." for a in range(30) for b in range(30)]
    path = tmp_path / f"tok{vocab_size}"
    train_bpe_tokenizer(corpus, vocab_size=vocab_size).save_pretrained(path)
    return path


@pytest.mark.parametrize("path", ["/no/such/model", "./missing", "runs/demo/sft/final"])
def test_a_missing_local_path_is_named_as_such_not_as_a_hub_id(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(
        tmp_path
    )  # relative paths resolve in an empty folder, not in a checkout after `make demo`
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(RlhfError) as e:
            load(path)
        assert str(e.value) == f"{path}: no such directory"


def test_a_missing_path_inside_a_local_folder_is_not_taken_for_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runs/nothere` beside a `runs/` folder is a mistyped path (a hub lookup would only time out offline)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for load in (load_tokenizer, load_causal_lm, load_reward_model):
        with pytest.raises(RlhfError) as e:
            load("runs/nothere")
        assert str(e.value) == "runs/nothere: no such directory"


def test_a_model_folder_without_tokenizer_files_says_so(tmp_path: Path, tiny_sft_model: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_sft_model / f, bare / f)
    with pytest.raises(RlhfError, match=r"bare: no tokenizer files \(one of tokenizer.json, "):
        load_tokenizer(str(bare))


def test_tokenizers_must_agree_token_for_token(tmp_path: Path, tiny_sft_model: Path) -> None:
    policy = load_tokenizer(str(tiny_sft_model))
    check_same_tokenizer(policy, load_tokenizer(str(tiny_sft_model)), "a", "b")  # the same one passes
    other = load_tokenizer(str(other_tokenizer_dir(tmp_path)))
    with pytest.raises(RlhfError, match=r"^ppo.policy and ppo.reward_model use different tokenizers: "):
        check_same_tokenizer(policy, other, "ppo.policy", "ppo.reward_model")
    # same size, one token moved: still different
    moved = tmp_path / "moved"
    shutil.copytree(tiny_sft_model, moved, ignore=shutil.ignore_patterns("*.safetensors"))
    data = json.loads((moved / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(t for t in vocab if vocab[t] > 10)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (moved / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(RlhfError, match=r"use different tokenizers: token .* is id"):
        check_same_tokenizer(policy, load_tokenizer(str(moved)), "x", "y")
    # the same files loaded as another class, which names no UNK: the same ids either way
    unk = load_tokenizer(str(tiny_sft_model))
    unk.unk_token = None
    assert unk.unk_token_id is None and policy.unk_token_id is not None
    check_same_tokenizer(policy, unk, "ppo.policy", "ppo.reward_model")


def test_reward_model_must_have_a_scalar_head(tiny_sft_model: Path, tiny_reward_model: Path) -> None:
    with pytest.raises(RlhfError, match=r"is not a reward model \(LlamaForCausalLM\): train one with"):
        load_reward_model(str(tiny_sft_model))
    assert load_reward_model(str(tiny_reward_model)).score.out_features == 1


def test_a_reward_model_is_refused_where_a_policy_is_read(tiny_reward_model: Path) -> None:
    """Its LM head would be loaded as random weights: generation would be noise, PPO's reference another noise."""
    with pytest.raises(
        RlhfError, match=r"is a reward model or critic \(LlamaForSequenceClassification\), not a causal LM"
    ):
        load_causal_lm(str(tiny_reward_model))


def with_other_tokenizer(model: Path, copy: Path, tmp_path: Path) -> Path:
    """A copy of the model at `copy` whose tokenizer files are another vocabulary's."""
    shutil.copytree(model, copy)
    for f in copy.glob("tokenizer*"):
        f.unlink()
    for f in other_tokenizer_dir(tmp_path).iterdir():
        shutil.copy(f, copy / f.name)
    return copy


def test_ppo_refuses_a_reward_model_with_another_tokenizer_before_any_work(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    rm = with_other_tokenizer(tiny_reward_model, tmp_path / "rm", tmp_path)
    cfg = PPOConfig(out_dir=str(tmp_path / "ppo"), policy=str(tiny_sft_model), reward_model=str(rm),
                    prompts_file=str(demo_data / "rl_prompts.jsonl"), precision="fp32")  # fmt: skip
    with pytest.raises(RlhfError, match=r"^ppo.policy and ppo.reward_model use different tokenizers"):
        ppo.run(cfg, quiet=True)
    assert not (tmp_path / "ppo").exists()


def test_ppo_refuses_a_reference_with_another_tokenizer_before_any_work(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    """The reference reads the policy's token ids: with another vocabulary its log-probs, and so the KL penalty,
    would be of other tokens."""
    reference = with_other_tokenizer(tiny_sft_model, tmp_path / "reference", tmp_path)
    cfg = PPOConfig(out_dir=str(tmp_path / "ppo"), policy=str(tiny_sft_model), reward_model=str(tiny_reward_model),
                    reference=str(reference), prompts_file=str(demo_data / "rl_prompts.jsonl"), precision="fp32",
                    iterations=1, batch_size=2, minibatch_size=2, micro_batch_size=2, max_new_tokens=4)  # fmt: skip
    with pytest.raises(RlhfError, match=r"^ppo.policy and ppo.reference use different tokenizers"):
        ppo.run(cfg, quiet=True)
    assert not (tmp_path / "ppo").exists()


def test_a_new_scalar_head_is_built_without_transformers_load_report(
    tiny_sft_model: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The report would list the new head as missing weights: expected, and noise in every reward run."""
    from transformers.utils import logging as hf_logging

    from rlhf.models.heads import build_scalar_model

    before = hf_logging.get_verbosity()
    model = build_scalar_model(str(tiny_sft_model))
    assert model.score.out_features == 1 and hf_logging.get_verbosity() == before
    assert "LOAD REPORT" not in capfd.readouterr().err + caplog.text


@pytest.mark.parametrize("model_type", [*ARCHS, *ALIBI])
def test_no_dropout_is_left_after_disable_dropout(tmp_path: Path, model_type: str) -> None:
    """Two training-mode forwards give the same logits: the Dropout modules and the rates layers copied from
    their config when built (OPT keeps its `dropout` as a float on each layer) are all off."""
    path = save_tiny(model_type, tmp_path / model_type)
    model = load_causal_lm(str(path), tokenizer=load_tokenizer(str(path)))
    model.config.update(
        {k: 0.5 for k, v in model.config.to_dict().items() if isinstance(v, float) and "drop" in k}
    )
    for module in model.modules():  # every rate on, as a model trained with dropout would have it
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(module, name, 0.5)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout on: the test can tell
        disable_dropout(model)
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_folder_of_lora_adapters_is_one_line_naming_what_to_load(tmp_path: Path) -> None:
    """`rlhf eval` or `rlhf generate` on a LoRA run's checkpoint said transformers' "Unrecognized model ...
    Should have a model_type key"."""
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "adapter_config.json").write_text('{"base_model_name_or_path": "base", "r": 8}')
    with pytest.raises(
        RlhfError, match=r"policy holds LoRA adapters, not a whole model: point at the run's final/"
    ):
        load_causal_lm(str(tmp_path / "policy"))


def test_damaged_weights_and_a_tokenizer_without_its_vocabulary_are_one_line(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path
) -> None:
    """A model.safetensors cut short was a SafetensorError traceback; a folder with tokenizer_config.json but no
    tokenizer.json gave HF's message cut at its first line ("... from one of: "), naming nothing."""
    for source, load in ((tiny_sft_model, load_causal_lm), (tiny_reward_model, load_reward_model)):
        cut = tmp_path / f"cut-{source.name}"
        shutil.copytree(source, cut)
        (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:100])
        with pytest.raises(RlhfError, match=r"^cannot load (reward )?model from .*cut-") as e:
            load(str(cut))
        assert "\n" not in str(e.value)
    no_vocab = tmp_path / "no-vocab"
    shutil.copytree(tiny_sft_model, no_vocab)
    (no_vocab / "tokenizer.json").unlink()
    with pytest.raises(RlhfError) as e:
        load_tokenizer(str(no_vocab))
    assert "\n" not in str(e.value) and not str(e.value).rstrip().endswith(":")


def test_a_model_folder_left_aside_by_an_interrupted_replace_is_put_back(
    tmp_path: Path, tiny_sft_model: Path
) -> None:
    """A process stopped between replace_dir's two renames left final/ at .final.old: it read as missing."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(tiny_sft_model, run / ".final.old")
    assert load_causal_lm(str(run / "final")).config.model_type == "llama"
    assert (run / "final").is_dir() and not (run / ".final.old").exists()
