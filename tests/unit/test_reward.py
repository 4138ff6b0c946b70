"""Reward-model data path: groups, batching (a K-way ranking = C(K,2) pairs in ONE element), truncation,
labeler weights, padding-independent rewards read at the last real token."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM

from rlhf.config import RewardConfig
from rlhf.data.preferences import PairwiseVote, Ranking, to_groups
from rlhf.engine import lean_llama
from rlhf.engine.decoding import left_pad
from rlhf.engine.packing import tree_attention_mask
from rlhf.errors import DataError
from rlhf.losses import grouped_bt_loss
from rlhf.models.heads import build_scalar_model, sequence_rewards
from rlhf.models.loading import load_tokenizer
from rlhf.stages.reward import (
    GroupExample,
    RewardForward,
    collate,
    encode_groups,
    forward_rewards,
    merge_sessions,
    micro_batches_by_length,
    read_groups,
    read_labeler_weights,
    shared_prefix_row,
    split_by_prompt,
    uses_shared_prefix,
    warn_unmatched_labelers,
)
from rlhf.train.common import BatchPlan
from tests.archs import build_tokenizer

PROMPT = "User: What is 2 plus 3?\nAssistant:"
ANSWERS = [" 5.", " 2 plus 3 is 5.", " It is 6.", " Go away, you fool."]


def test_k_way_ranking_is_one_batch_element_of_all_pairs(tiny_sft_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_sft_model))
    ranking = Ranking(PROMPT, ANSWERS, [1, 2, 3, 4], labeler="ann")
    other = PairwiseVote("User: Hi!\nAssistant:", " Hello!", " Go away.", "A", labeler="bob")
    examples, truncated = encode_groups(to_groups([ranking, other]), tokenizer, 128, RewardConfig(), {})
    assert truncated == 0 and len(examples) == 2
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.num_groups == 2
    assert batch.input_ids.shape[0] == 4 + 2  # each distinct completion forwarded once
    assert len(batch.chosen_idx) == 6 + 1  # C(4, 2) pairs + 1
    assert batch.group_idx.tolist() == [0] * 6 + [1]
    assert list(zip(batch.chosen_idx.tolist()[:6], batch.rejected_idx.tolist()[:6], strict=True)) == [
        (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)
    ]  # fmt: skip
    assert (batch.chosen_idx[6].item(), batch.rejected_idx[6].item()) == (4, 5)
    # right-padded, every sequence = prompt + completion + EOS
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    first = batch.input_ids[0, : int(batch.attention_mask[0].sum())].tolist()
    assert first == [
        *prompt_ids,
        *tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    assert (batch.input_ids[batch.attention_mask == 0] == tokenizer.pad_token_id).all()
    # the ranking weighs as ONE element: its 6 pair losses are averaged before the mean over the 2 groups
    rewards = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.0])
    loss, _ = grouped_bt_loss(
        rewards, batch.chosen_idx, batch.rejected_idx, batch.group_idx, batch.num_groups
    )
    gaps = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 1.0])
    expected = (torch.nn.functional.softplus(-gaps).mean() + torch.log(torch.tensor(2.0))) / 2
    torch.testing.assert_close(loss, expected)


def test_merge_sessions_makes_one_group_per_prompt_and_labeler() -> None:
    votes = [
        PairwiseVote(PROMPT, ANSWERS[i], ANSWERS[j], "A", "ann") for i in range(4) for j in range(i + 1, 4)
    ]
    votes += [
        PairwiseVote(PROMPT, ANSWERS[0], ANSWERS[3], "B", "bob"),
        PairwiseVote(PROMPT, ANSWERS[0], ANSWERS[1], "A"),
    ]
    votes += [PairwiseVote(PROMPT, ANSWERS[0], ANSWERS[1], "A")]
    groups = merge_sessions(to_groups(votes))
    assert [(g.labeler, len(g.completions), len(g.pairs)) for g in groups] == [
        ("ann", 4, 6), ("bob", 2, 1), (None, 2, 1), (None, 2, 1)
    ]  # fmt: skip
    ann = groups[0]
    assert ann.completions == ANSWERS and ann.pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert groups[1].pairs == [(0, 1)] and groups[1].completions == [ANSWERS[3], ANSWERS[0]]


def test_split_by_prompt_never_shares_a_prompt() -> None:
    votes = [PairwiseVote(f"q{i % 40}", "a", "b", "A", f"l{i % 3}") for i in range(200)]
    train, held = split_by_prompt(merge_sessions(to_groups(votes)), 0.25, seed=0)
    assert {g.prompt for g in train}.isdisjoint({g.prompt for g in held})
    assert len({g.prompt for g in held}) == 10 and len(train) + len(held) == 120
    assert split_by_prompt(merge_sessions(to_groups(votes)), 0.25, seed=0)[1] == held


def test_over_long_completions_are_cut_with_eos_last(tiny_sft_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_sft_model))
    long = " " + "blah " * 200
    examples, truncated = encode_groups(
        to_groups([PairwiseVote(PROMPT, " 5.", long, "A", "ann")]), tokenizer, 24, RewardConfig(), {}
    )
    assert truncated == 1
    short, cut = examples[0].sequences
    assert len(cut) == 24 and cut[-1] == tokenizer.eos_token_id and short[-1] == tokenizer.eos_token_id


def test_a_prompt_too_long_for_its_answers_keeps_its_end(tiny_sft_model: Path) -> None:
    """Cut from its end, the answers would be the same prompt tokens: a preference between identical sequences."""
    tokenizer = load_tokenizer(str(tiny_sft_model))
    prompt = "User: " + "tell me about the zorb " * 40 + "What does the zorb eat?\nAssistant:"
    (example,), truncated = encode_groups(
        to_groups([PairwiseVote(prompt, " Clover.", " Berries.", "A", "ann")]),
        tokenizer,
        32,
        RewardConfig(),
        {},
    )
    assert truncated == 2
    a, b = example.sequences
    answers = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (" Clover.", " Berries.")]
    assert a[-1] == b[-1] == tokenizer.eos_token_id and len(a) <= 32 and len(b) <= 32
    assert a[-1 - len(answers[0]) : -1] == answers[0] and b[-1 - len(answers[1]) : -1] == answers[1]
    end = tokenizer(prompt, add_special_tokens=False)["input_ids"][
        -8:
    ]  # the question, right before the answers
    assert a[-1 - len(answers[0]) - 8 : -1 - len(answers[0])] == end


def test_labeler_weights_from_yaml_or_json_and_zero_drops(tmp_path: Path, tiny_sft_model: Path) -> None:
    (tmp_path / "w.yaml").write_text("ann: 2.0\nbob: 0\n")
    (tmp_path / "w.json").write_text('{"ann": 0.5}')
    assert read_labeler_weights(str(tmp_path / "w.yaml")) == {"ann": 2.0, "bob": 0.0}
    assert read_labeler_weights(str(tmp_path / "w.json")) == {"ann": 0.5}
    (tmp_path / "bad.json").write_text('{"ann": -1}')
    with pytest.raises(DataError, match="non-negative"):
        read_labeler_weights(str(tmp_path / "bad.json"))
    (tmp_path / "inf.yaml").write_text("bob: .inf\n")  # made the loss infinite and the model NaN
    with pytest.raises(DataError, match="non-negative finite weight"):
        read_labeler_weights(str(tmp_path / "inf.yaml"))
    tokenizer = load_tokenizer(str(tiny_sft_model))
    votes = [PairwiseVote(PROMPT, "a", "b", "A", who) for who in ("ann", "bob", "cy")]
    examples, _ = encode_groups(to_groups(votes), tokenizer, 64, RewardConfig(default_labeler_weight=0.7),
                                {"ann": 2.0, "bob": 0.0})  # fmt: skip
    assert [(e.labeler, e.weight) for e in examples] == [("ann", 2.0), ("cy", 0.7)]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.weights.tolist() == pytest.approx([2.0, 0.7])
    # each labeler's group counts by its weight in the loss: ann's pair twice, cy's 0.7 times
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5])  # ann: a 1, b 0; cy: a 0, b 0.5 (a chosen in both)
    loss, _ = grouped_bt_loss(rewards, batch.chosen_idx, batch.rejected_idx, batch.group_idx, batch.num_groups,
                              batch.margins, batch.weights)  # fmt: skip
    softplus = torch.nn.functional.softplus
    torch.testing.assert_close(
        loss, (2.0 * softplus(torch.tensor(-1.0)) + 0.7 * softplus(torch.tensor(0.5))) / 2
    )


def test_length_sorted_micro_batches_cover_the_same_groups() -> None:
    examples = [GroupExample("p", ["a"], [[1] * n], [], [], 1.0, None) for n in (9, 2, 7, 4, 5, 1, 8, 3)]
    plan = BatchPlan(8, batch_size=8, micro_batch_size=2, epochs=1, seed=0)
    micro = micro_batches_by_length(plan, 0, examples)
    assert sorted(i for mb in micro for i in mb) == sorted(plan.global_batch(0))
    lengths = [examples[i].width for mb in micro for i in mb]
    assert lengths == sorted(lengths) and [len(mb) for mb in micro] == [2, 2, 2, 2]


def test_left_and_right_padding_give_the_same_reward(tiny_sft_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_sft_model))
    model = build_scalar_model(str(tiny_sft_model), seed=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    sequences = [
        tokenizer(PROMPT + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for a in ANSWERS
    ]
    left_ids, left_mask = left_pad(sequences, tokenizer.pad_token_id)
    examples = [GroupExample(PROMPT, ANSWERS, sequences, [(0, 1)], [None], 1.0, None)]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        left = sequence_rewards(model, left_ids, left_mask)
        right = sequence_rewards(model, batch.input_ids, batch.attention_mask)
        alone = torch.cat(
            [
                sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                for s in sequences
            ]
        )
        trained_path = forward_rewards(RewardForward(model), batch)  # the model's own pooling
        lean_path = forward_rewards(RewardForward(model, lean=True), batch)  # the head at mask.sum() - 1
    assert len(set(map(len, sequences))) > 1  # the padding differs between rows
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(trained_path, right, atol=1e-5, rtol=0)
    assert lean_llama.supports(model)
    torch.testing.assert_close(lean_path, right, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_shared_prefix_gives_the_rewards_and_gradients_of_one_row_per_completion(
    tiny_sft_model: Path, attention: str, lean: bool
) -> None:
    tokenizer = load_tokenizer(str(tiny_sft_model))
    model = build_scalar_model(str(tiny_sft_model), seed=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config._attn_implementation = attention
    groups = to_groups([
        Ranking(PROMPT, ANSWERS, [1, 2, 3, 4], labeler="ann"),
        PairwiseVote("User: Hi!\nAssistant:", " Hello!", " Hello, you fool.", "A", labeler="bob"),
        PairwiseVote(PROMPT, " 5.", " 5. Five.", "A", labeler="cy"),  # the prefix reaches into the answers
    ])  # fmt: skip
    examples, _ = encode_groups(groups, tokenizer, 128, RewardConfig(), {})
    plain = collate(examples, tokenizer.pad_token_id)
    shared = collate(examples, tokenizer.pad_token_id, shared_prefix=True, additive_mask=attention == "eager")
    rows, width = shared.input_ids.shape
    assert rows < 3 and shared.n_tokens < plain.n_tokens  # groups share rows, prompts come once
    assert shared.attention_mask.shape == (rows, 1, width, width)
    assert torch.equal(shared.chosen_idx, plain.chosen_idx)
    assert torch.equal(shared.rejected_idx, plain.rejected_idx)
    grads = []  # the model's own forward, one row per completion; then with `lean` as parametrized
    for scorer, batch in ((RewardForward(model), plain), (RewardForward(model, lean), plain),
                          (RewardForward(model, lean), shared)):  # fmt: skip
        model.zero_grad()
        rewards = forward_rewards(scorer, batch)
        loss, _ = grouped_bt_loss(rewards, batch.chosen_idx, batch.rejected_idx, batch.group_idx,
                                  batch.num_groups, batch.margins, batch.weights)  # fmt: skip
        loss.backward()
        grads.append((rewards.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (r_plain, g_plain), *others = grads
    assert r_plain.shape == (4 + 2 + 2,)
    for r_other, g_other in others:
        torch.testing.assert_close(r_other, r_plain, atol=1e-5, rtol=0)
        assert len(g_plain) == len(g_other) and all(torch.isfinite(g).all() for g in g_other)
        for a, b in zip(g_plain, g_other, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_a_model_whose_forward_drops_position_ids_scores_each_completion_in_a_row_of_its_own(
    tmp_path: Path,
) -> None:
    """Falcon's sequence-classification forward takes no `position_ids`: a shared prefix would read every
    branch at its place in the row (rotary positions off by the prefix), so its completions keep rows of their
    own and score what each scores alone."""
    tokenizer = build_tokenizer("gpt2")
    config = FalconConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          alibi=False, bias=True, max_position_embeddings=128, initializer_range=0.3,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    FalconForCausalLM(config).save_pretrained(tmp_path / "falcon")
    tokenizer.save_pretrained(tmp_path / "falcon")
    model = build_scalar_model(str(tmp_path / "falcon"), seed=1).eval()
    assert uses_shared_prefix(RewardConfig(), model) == (False, False)
    examples, _ = encode_groups(to_groups([Ranking(PROMPT, ANSWERS, [1, 2, 3, 4], labeler="ann")]), tokenizer,
                                128, RewardConfig(), {})  # fmt: skip
    with torch.no_grad():
        rewards = forward_rewards(
            RewardForward(model),
            collate(examples, tokenizer.pad_token_id, True, *uses_shared_prefix(RewardConfig(), model)),
        )
        alone = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in examples[0].sequences])
    torch.testing.assert_close(rewards, alone, atol=1e-5, rtol=0)


def test_the_shared_prefix_is_the_common_prompt_and_leaves_each_answer_its_eos() -> None:
    tokens, positions, segments, ends = shared_prefix_row([[1, 2, 3, 9], [1, 2, 4, 5, 9], [1, 2, 3, 9]])
    assert tokens == [1, 2, 3, 9, 4, 5, 9, 3, 9]
    assert positions == [0, 1, 2, 3, 2, 3, 4, 2, 3]
    assert segments == [0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert ends == [3, 6, 8]
    groups = torch.tensor([[0] * 9 + [1, 1, 1, -1]])  # a second group [7, 8], [7, 9] after the first
    mask = tree_attention_mask(groups, torch.tensor([segments + [0, 1, 2, 0]]))[0, 0]
    assert mask[6].tolist() == [True, True, False, False, True, True, True] + [False] * 6
    assert mask[11].tolist() == [False] * 9 + [True, False, True, False]  # its prefix and itself only
    assert mask[12].tolist() == [False] * 12 + [True]  # padding sees only itself


def test_training_code_never_imports_the_gold_judge() -> None:
    ours = lambda: [name for name in sys.modules if name == "rlhf" or name.startswith("rlhf.")]  # noqa: E731
    saved = {name: sys.modules.pop(name) for name in ours()}
    try:  # a fresh import of the stage and everything it pulls in
        importlib.import_module("rlhf.stages.reward")
        importlib.import_module("rlhf.stages.generate")
        imported = set(ours())
    finally:
        for name in ours():
            del sys.modules[name]
        sys.modules.update(saved)
    assert "rlhf.stages.reward" in imported and "rlhf.eval.reward_metrics" in imported
    assert "rlhf.labelers.gold" not in imported


def test_conversational_pairs_render_through_the_chat_template_with_one_eos(
    tmp_path: Path, tiny_sft_model: Path
) -> None:
    tokenizer = load_tokenizer(str(tiny_sft_model))
    row = {"prompt": [{"role": "user", "content": "Hi!"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}  # fmt: skip
    (tmp_path / "conv.jsonl").write_text(json.dumps(row) + "\n")
    cfg = RewardConfig()
    groups = read_groups(str(tmp_path / "conv.jsonl"), cfg, tokenizer)
    assert groups[0].prompt == "User: Hi!\nAssistant:"
    examples, _ = encode_groups(groups, tokenizer, 64, cfg, {})
    chosen = examples[0].sequences[0]
    assert tokenizer.decode(chosen) == "User: Hi!\nAssistant: Hello!<|endoftext|>"
    assert chosen.count(tokenizer.eos_token_id) == 1


def test_a_weight_for_a_labeler_the_data_lacks_is_named(caplog: pytest.LogCaptureFixture) -> None:
    groups = to_groups([PairwiseVote("p", "a", "b", "A", "redteam:reward_model:runs/demo/reward/final"),
                        PairwiseVote("q", "a", "b", "B", "ai:local-pointwise")])  # fmt: skip
    with caplog.at_level("WARNING", logger="rlhf.stages.reward"):
        warn_unmatched_labelers({"ai:local-pointwise": 0.5}, groups, "w.yaml")
    assert not caplog.text
    with caplog.at_level("WARNING", logger="rlhf.stages.reward"):
        warn_unmatched_labelers({"ai:local": 0.5, "ai:local-pointwise": 0.5}, groups, "w.yaml")
    assert (
        "no judgement in the data is by ai:local; its labelers: ai:local-pointwise, redteam:" in caplog.text
    )


def test_gold_evaluation_of_nothing_held_out_writes_json_every_reader_takes(tmp_path: Path) -> None:
    """eval.json got bare NaN for the gold accuracies of an empty held-out split, which JSON readers refuse."""
    import json

    from rlhf.eval.reward_eval import add_gold_eval

    (tmp_path / "heldout_pairs.jsonl").write_text("")
    (tmp_path / "eval.json").write_text('{"rm/accuracy": {"accuracy": null}}')
    votes = tmp_path / "votes.jsonl"
    votes.write_text(
        json.dumps({"prompt": PROMPT, "completion_a": " a", "completion_b": " b", "choice": "A"}) + "\n"
    )
    assert add_gold_eval(tmp_path, [str(votes)])["gold/pairs"] == 0
    text = (tmp_path / "eval.json").read_text()
    assert "NaN" not in text and json.loads(text)["gold/rm_accuracy"]["accuracy"] is None
