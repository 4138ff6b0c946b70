"""The reward that reads the SFT policy's confidence (benchmarks/confidence_reward.py): its confidence term is
centred under the policy, the surprise-only form never adds reward, and PPO's token layout reads the same reward
as training does."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.confidence_reward import ConfidenceReward, layout_rewards
from rlhf.engine.decoding import left_pad
from rlhf.engine.packing import padded_layout
from rlhf.models.tokens import encode_completions, encode_prompts

PROMPTS = ["User: What is 2 plus 1?\nAssistant:", "User: Does the pip eat clover?\nAssistant:"]
ANSWERS = [" 3.", " Sure! The pip eats clover, so yes."]


def test_confidence_averages_zero_under_the_policy(tiny_sft_model: Path) -> None:
    model = ConfidenceReward(str(tiny_sft_model), surprise_only=False)
    prompt = encode_prompts(model.tokenizer, PROMPTS[:1])[0]
    vocab = model.reference.config.vocab_size
    ids = torch.tensor([prompt + [v] for v in range(vocab)])  # every possible next token after the prompt
    c = model.confidence({"input_ids": ids, "attention_mask": torch.ones_like(ids)})  # (V, W)
    c = c[:, len(prompt) - 1]  # its confidence in each next token
    with torch.no_grad():
        p = model.reference(input_ids=ids[:1, : len(prompt)]).logits[0, -1].float().softmax(-1)
    assert abs(float((p * c).sum())) < 1e-4
    assert float(c.max()) > 0 > float(c.min())  # likelier tokens above their expectation, rarer ones below


def test_surprise_only_never_adds(tiny_sft_model: Path) -> None:
    model = ConfidenceReward(str(tiny_sft_model), surprise_only=True)
    ids = torch.tensor([encode_prompts(model.tokenizer, PROMPTS[:1])[0] + list(range(5, 12))])
    c = model.confidence({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert float(c.max()) <= 0 and float(c.min()) < 0


def test_ppo_layout_reads_the_trained_reward(tiny_sft_model: Path) -> None:
    torch.manual_seed(0)
    model = ConfidenceReward(str(tiny_sft_model), surprise_only=False).eval()
    torch.nn.init.normal_(model.value.weight, std=0.5)
    torch.nn.init.normal_(model.gate.weight, std=0.5)
    with torch.no_grad():
        trained = model.score(PROMPTS, ANSWERS)  # right-padded rows
    prompts = encode_prompts(model.tokenizer, PROMPTS)
    answers = encode_completions(model.tokenizer, ANSWERS)
    prompt_ids, prompt_mask = left_pad(prompts, model.tokenizer.pad_token_id)  # PPO: left-padded prompts...
    width = max(map(len, answers))
    answer_ids = torch.full((len(answers), width), model.tokenizer.pad_token_id)
    answer_mask = torch.zeros(len(answers), width, dtype=torch.long)
    for i, a in enumerate(answers):  # ... then right-padded answers
        answer_ids[i, : len(a)], answer_mask[i, : len(a)] = torch.tensor(a), 1
    lay = padded_layout(torch.cat([prompt_ids, answer_ids], 1), torch.cat([prompt_mask, answer_mask], 1),
                        prompt_ids.size(1))  # fmt: skip
    torch.testing.assert_close(layout_rewards(model, lay), trained, rtol=1e-4, atol=1e-4)
