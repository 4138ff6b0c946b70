"""rlhf.models.tokens on tokenizers that behave as stock ones do (tests/archs.py): BOS once, the chat template's
end-of-turn token, a PAD added to tokenizers without one (or whose PAD is EOS) without changing the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import RewardConfig
from rlhf.data.preferences import PreferenceGroup
from rlhf.engine.decoding import SamplingParams, generate
from rlhf.errors import RlhfError
from rlhf.models.heads import build_scalar_model
from rlhf.models.loading import check_same_tokenizer, load_causal_lm, load_tokenizer, save_pretrained_atomic
from rlhf.models.tokens import (
    DEFAULT_CHAT_TEMPLATE,
    chat_prompt,
    encode_completions,
    encode_prompts,
    end_of_turn_id,
    mask_pad,
    prepare_tokenizer,
    stop_ids,
)
from rlhf.stages import dpo, reward
from rlhf.train.demonstrations import read_demonstrations, tokenize_demonstrations
from tests.archs import ARCHS, build_model, build_tokenizer, rigged, save_tiny

CHAT = [{"role": "user", "content": "Is the sky green?"}, {"role": "assistant", "content": "No, it is blue."}]


def write_chat(path: Path, rows: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "phi3"])
def test_bos_is_added_once_to_prompts_and_never_to_responses(family: str) -> None:
    tok = build_tokenizer(family)
    bos = tok.bos_token_id
    prompts = encode_prompts(tok, ["User: Hello!\nAssistant:", tok.bos_token + "User: Hi"])
    assert [p[0] for p in prompts] == [bos, bos]
    assert all(p.count(bos) == 1 for p in prompts)  # the second already held BOS as text: not doubled
    assert bos not in encode_completions(tok, [" Hello!"])[0]


@pytest.mark.parametrize("family", ["gpt2", "neox", "chatml"])
def test_tokenizers_that_add_no_bos_get_none(family: str) -> None:
    tok = build_tokenizer(family)
    assert encode_prompts(tok, ["User: Hello!"]) == [
        tok("User: Hello!", add_special_tokens=False)["input_ids"]
    ]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sft_trains_on_bos_once(tmp_path: Path, family: str) -> None:
    tok = load_tokenizer(str(save_tiny("llama" if family == "llama" else "mistral", tmp_path / "m")))
    pairs = read_demonstrations(write_chat(tmp_path / "d.jsonl", [CHAT]), tok)
    pairs.append(("User: Hello!\nAssistant:", " Hello!"))
    examples, _, _ = tokenize_demonstrations(pairs, tok, 128)
    for e in examples:
        assert e["input_ids"][0] == tok.bos_token_id and e["input_ids"].count(tok.bos_token_id) == 1
        assert e["labels"][-1] == tok.eos_token_id  # the template closes the answer with EOS


def test_sft_labels_the_chatml_turn_through_its_end_of_turn_token(tmp_path: Path) -> None:
    tok = load_tokenizer(str(save_tiny("qwen2", tmp_path / "m")))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    prompt, response = read_demonstrations(write_chat(tmp_path / "d.jsonl", [CHAT]), tok)[0]
    assert prompt.endswith("<|im_start|>assistant\n") and response == "No, it is blue.<|im_end|>"
    (example,), _, _ = tokenize_demonstrations([(prompt, response)], tok, 128)
    answer = [t for t in example["labels"] if t != -100]
    assert answer[-1] == im_end and tok.eos_token_id not in answer  # no EOS glued after the turn
    assert tok.decode(answer[:-1]) == "No, it is blue."
    assert example["input_ids"] == tok(prompt + response, add_special_tokens=False)["input_ids"]


def test_chat_data_on_a_tokenizer_without_template_uses_the_default_one(tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO", logger="rlhf.models.tokens"):
        tok = load_tokenizer(str(save_tiny("gpt_neox", tmp_path / "m")))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert sum("no chat template" in r.getMessage() for r in caplog.records) == 1
    pairs = read_demonstrations(write_chat(tmp_path / "d.jsonl", [CHAT]), tok)
    assert pairs == [("User: Is the sky green?\nAssistant:", " No, it is blue.<|endoftext|>")]


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_the_default_template_tokenizes_as_our_prompts_do(family: str) -> None:
    """Tools that tokenize a rendered chat without adding special tokens (pipelines, vLLM) get BOS where we do."""
    tok = prepare_tokenizer(build_tokenizer(family))
    ours = encode_prompts(tok, [chat_prompt(tok, CHAT[:1])])[0]
    theirs = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert theirs["input_ids"] == ours
    assert (ours[0] == tok.bos_token_id) == (family == "llama")


def test_end_of_turn_and_stop_ids_follow_the_template() -> None:
    names = {
        f: build_tokenizer(f).convert_ids_to_tokens(stop_ids(build_tokenizer(f))) for f in ("chatml", "gemma")
    }
    assert names == {"chatml": ["<|endoftext|>", "<|im_end|>"], "gemma": ["<eos>", "<end_of_turn>"]}
    mistral = build_tokenizer("mistral")
    assert end_of_turn_id(mistral) == mistral.eos_token_id and stop_ids(mistral) == [mistral.eos_token_id]


def test_generation_stops_at_the_end_of_turn_token(tmp_path: Path) -> None:
    path = save_tiny("qwen2", tmp_path / "m")
    tok = load_tokenizer(str(path))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = rigged(load_causal_lm(str(path), tokenizer=tok).eval(), im_end)
    prompt = encode_prompts(
        tok, [str(tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True))]
    )
    gen = generate(model, prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=0), stop_ids(tok),
                   tok.pad_token_id)  # fmt: skip
    assert gen.response_ids[0].tolist() == [im_end] and bool(gen.ended[0])


def test_a_saved_policy_stops_at_the_end_of_turn_token_in_transformers_generate(tmp_path: Path) -> None:
    path = save_tiny("qwen2", tmp_path / "m")
    tok = load_tokenizer(str(path))
    save_pretrained_atomic(tmp_path / "final", load_causal_lm(str(path), tokenizer=tok), tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = rigged(AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval(), im_end)
    assert model.generation_config.eos_token_id == [tok.eos_token_id, im_end]
    prompt = AutoTokenizer.from_pretrained(tmp_path / "final").apply_chat_template(
        CHAT[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out[0, prompt["input_ids"].shape[1] :].tolist() == [im_end]


def test_pad_is_never_sampled(tmp_path: Path) -> None:
    path = save_tiny("gpt2", tmp_path / "m")
    tok = load_tokenizer(str(path))
    model = rigged(load_causal_lm(str(path), tokenizer=tok).eval(), tok.pad_token_id)
    gen = generate(model, [[5, 6]], SamplingParams(max_new_tokens=4, temperature=1.0, seed=0), stop_ids(tok),
                   tok.pad_token_id)  # fmt: skip
    assert tok.pad_token_id not in gen.response_ids[0].tolist() and gen.response_mask.sum() == 4
    logits = torch.zeros(1, 4)
    assert mask_pad(logits, 2, [0]).isinf().tolist() == [[False, False, True, False]]
    assert not mask_pad(logits, 0, [0]).isinf().any()  # PAD that is also a stop id stays


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "qwen2", "qwen2_moe"])
def test_a_pad_is_added_without_changing_the_models_outputs(tmp_path: Path, model_type: str) -> None:
    path = save_tiny(model_type, tmp_path / "m")
    stock = build_tokenizer(ARCHS[model_type][0])
    assert stock.pad_token_id in (None, stock.eos_token_id)
    tok = load_tokenizer(str(path))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == len(stock) != tok.eos_token_id
    before = build_model(model_type, stock).eval()
    after = load_causal_lm(str(path), tokenizer=tok).eval()
    assert (
        after.get_input_embeddings().weight.shape[0] == len(tok)
        and after.config.pad_token_id == tok.pad_token_id
    )
    ids = torch.tensor([encode_prompts(tok, ["User: Hello! How can I help?"])[0]])
    with torch.no_grad():
        old, new = before(input_ids=ids).logits, after(input_ids=ids).logits
    assert new.shape[-1] == old.shape[-1] + 1
    torch.testing.assert_close(new[..., : old.shape[-1]], old, rtol=0, atol=0)


def test_a_reward_model_from_the_policy_gets_the_same_tokenizer(tmp_path: Path) -> None:
    path = save_tiny("gpt2", tmp_path / "m")
    policy_tok = load_tokenizer(str(path))
    rm = build_scalar_model(str(path), tokenizer=policy_tok)
    assert rm.get_input_embeddings().weight.shape[0] == len(policy_tok)
    assert rm.config.pad_token_id == policy_tok.pad_token_id
    check_same_tokenizer(policy_tok, load_tokenizer(str(path)), "policy", "reward model")


def test_adding_pad_can_be_turned_off(tmp_path: Path) -> None:
    path = save_tiny("gpt2", tmp_path / "m")
    with pytest.raises(
        RlhfError,
        match=r"uses EOS \(id 0\) as PAD.*set add_pad_token: true in this stage.s section \(--set STAGE.add_pad_token=true",
    ):
        load_tokenizer(str(path), add_pad_token=False)
    gemma = save_tiny("gemma", tmp_path / "g")  # its own PAD: nothing to add, nothing refused
    assert load_tokenizer(str(gemma), add_pad_token=False).pad_token == "<pad>"


@pytest.mark.parametrize("family", ["llama", "chatml"])
def test_reward_and_dpo_score_bos_once_and_keep_the_end_of_turn_token(family: str) -> None:
    tok = prepare_tokenizer(build_tokenizer(family))
    turn_end = end_of_turn_id(tok)
    closed = "No, it is blue." + tok.convert_ids_to_tokens(turn_end) + "\n"  # as a chat template renders it
    group = PreferenceGroup("User: Is the sky green?\nAssistant:", [" No.", closed], [(1, 0)], [None])
    (example,), _ = reward.encode_groups([group], tok, 128, RewardConfig(), {})
    (judgement,), _ = dpo.encode([group], tok, 128)
    prompt = tok(group.prompt, add_special_tokens=False)["input_ids"]
    start = [tok.bos_token_id, *prompt] if family == "llama" else prompt  # BOS where the tokenizer adds it
    for seq in [*example.sequences, *(judgement.prompt_ids + a for a in judgement.answers)]:
        assert seq[: len(start)] == start and tok.bos_token_id not in seq[len(start) :]
    assert [s[-1] for s in example.sequences] == [tok.eos_token_id, turn_end]  # plain text gets EOS
    assert [a[-1] for a in judgement.answers] == [tok.eos_token_id, turn_end]


def test_dpo_leaves_out_a_pair_whose_answers_are_the_same_once_cut(caplog: pytest.LogCaptureFixture) -> None:
    """Two answers that differ only past max_len were trained on as a pair: a loss of log 2 with no gradient,
    counted as a miss in dpo/accuracy (163 of 3,942 demo pairs at max_seq_len 8)."""
    tok = prepare_tokenizer(build_tokenizer("llama"))
    prompt = "User: Is the sky green?\nAssistant:"
    answers = [" No, it is blue and always has been.", " No, it is blue and never was green.", " Yes."]
    group = PreferenceGroup(prompt, answers, [(0, 1), (0, 2)], [None, None])
    width = len(encode_prompts(tok, [prompt])[0]) + 6  # room for the first six tokens of an answer
    with caplog.at_level("WARNING"):
        (judgement,), _ = dpo.encode([group], tok, width)
    assert judgement.answers[0] == judgement.answers[1] and judgement.pairs == [(0, 2)]
    assert "1 pairs whose answers are the same once cut" in caplog.text
    only, _ = dpo.encode([PreferenceGroup(prompt, answers[:2], [(0, 1)], [None])], tok, width)
    assert only == []


def test_rows_past_the_tokenizer_are_never_sampled(tmp_path: Path) -> None:
    """Qwen2.5 and Phi-3 have embedding rows past their tokenizer's last id: sampled, they decoded to "" and
    PPO trained on them (43 of 237 tokens of a tiny model). They go into the generation config's
    suppress_tokens, which the decoder and `rlhf serve` never sample."""
    from transformers import Qwen2Config

    tok = prepare_tokenizer(build_tokenizer("chatml"))
    config = Qwen2Config(vocab_size=len(tok) + 100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.5)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = load_causal_lm(str(tmp_path / "m"), tokenizer=load_tokenizer(str(tmp_path / "m")))
    assert set(range(len(tok), len(tok) + 100)) <= set(model.generation_config.suppress_tokens)
    prompts = [tok("User: hi\nAssistant:", add_special_tokens=False)["input_ids"]] * 16
    gen = generate(
        model, prompts, SamplingParams(24, temperature=1.5, seed=0), stop_ids(tok), tok.pad_token_id
    )
    sampled = gen.response_ids[gen.response_mask.bool()]
    assert sampled.numel() > 100 and int(sampled.max()) < len(tok)
