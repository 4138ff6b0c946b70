"""The stages' forwards on every architecture of tests/archs.py give what transformers' plain forward gives.

Each reference is a forward of one sequence alone, unpadded: `model(input_ids).logits` for the policy, the
backbone's hidden states times the scalar head for critic values and rewards. Against it, in fp32: PPO's
token log-probs in packed rows and in padded rows (one row per sequence), their gradients, the critic's values
and the reward model's scores read from the same layouts; the reward trainer's rewards (plain rows and shared
prefixes) and the judges' `sequence_rewards` on left-padded batches; the SFT loss; and generation's per-step
log-probs. On a CPU, a plain Llama's training and scoring forwards go through the lean forward
(rlhf.engine.lean_llama) as the stages choose it, so these also hold that path to transformers'; generation
runs every architecture through rlhf.engine.decode_cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from rlhf.engine import lean_llama
from rlhf.engine.decoding import SamplingParams, generate
from rlhf.engine.packing import packed_layout, padded_layout, takes_4d_mask
from rlhf.models.heads import backbone, build_scalar_model, score_head, sequence_rewards, set_normalisation
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.wrappers import Actor, Critic, response_values, reward_scores
from rlhf.rl_math import logprobs_from_logits
from rlhf.stages.reward import GroupExample, RewardForward
from rlhf.stages.reward import collate as reward_collate
from rlhf.train.common import policy_forward
from rlhf.train.lm_loop import NextTokenLoss, collate
from tests.archs import ARCHS, save_tiny

# fp32 throughout: what differs between two layouts is the order of sums, a few ulps
TOL = {"rtol": 1e-5, "atol": 1e-5}
# (prompt, response) lengths of four sequences: left-padded prompts, right-padded responses
SHAPES = [(5, 2), (2, 6), (3, 1), (1, 4)]
TEMPERATURE = 0.7


class Models:
    """A tiny architecture's policy, critic and reward model, as the stages load them (PAD added)."""

    def __init__(self, arch: str, root: Path) -> None:
        path = str(save_tiny(arch, root / arch))
        self.tokenizer = load_tokenizer(path)
        self.policy = load_causal_lm(path, tokenizer=self.tokenizer)
        self.critic = build_scalar_model(path, seed=1, tokenizer=self.tokenizer)
        self.reward_model = build_scalar_model(path, seed=2, tokenizer=self.tokenizer)
        for scalar in (self.critic, self.reward_model):  # a stored normalisation that the forwards must apply
            set_normalisation(scalar, shift=0.25, scale=1.5)
        self.pad_id = int(self.tokenizer.pad_token_id)

    def sequences(self, seed: int = 0) -> list[tuple[list[int], list[int]]]:
        """(prompt, response) token ids of SHAPES: ordinary tokens, never a special one."""
        gen = torch.Generator().manual_seed(seed)
        specials = set(self.tokenizer.all_special_ids)
        ordinary = torch.tensor([i for i in range(len(self.tokenizer)) if i not in specials])
        draw = lambda n: ordinary[torch.randint(len(ordinary), (n,), generator=gen)].tolist()  # noqa: E731
        return [(draw(p), draw(r)) for p, r in SHAPES]

    def batch(self, seqs: list[tuple[list[int], list[int]]]) -> tuple[Tensor, Tensor, int]:
        """(ids, mask, P) as a rollout holds them: prompts left-padded to P, responses right-padded."""
        p, t = max(len(a) for a, _ in seqs), max(len(b) for _, b in seqs)
        ids = torch.full((len(seqs), p + t), self.pad_id)
        mask = torch.zeros_like(ids)
        for i, (a, b) in enumerate(seqs):
            ids[i, p - len(a) : p + len(b)] = torch.tensor(a + b)
            mask[i, p - len(a) : p + len(b)] = 1
        return ids, mask, p


@pytest.fixture(scope="module", params=sorted(ARCHS))
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(request.param, tmp_path_factory.mktemp("exact"))


def plain_logprobs(model: Any, prompt: list[int], response: list[int], temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) of each response token from `model(input_ids).logits` of the sequence alone."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (T, V) the outputs before each token
    return (logits.float() / temperature).log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def plain_head(model: Any, sequence: list[int]) -> Tensor:
    """The normalised scalar head at every position of the sequence alone, from the backbone's hidden states."""
    hidden = backbone(model)(input_ids=torch.tensor([sequence])).last_hidden_state[0]  # (L, H)
    return (score_head(model)(hidden)[:, 0].float() - 0.25) / 1.5


def assert_same_gradients(got: dict[str, Tensor], expected: dict[str, Tensor], label: str) -> None:
    """Each parameter's gradient within 1e-4 relative, or 1e-5 of the tensor's largest entry (an entry that sums
    terms of both signs to near zero keeps the rounding of its terms), or 1e-8 (a gradient that is zero in exact
    arithmetic, e.g. of a key bias, which softmax cancels)."""
    assert got.keys() == expected.keys() and sum(float(g.abs().sum()) for g in expected.values()) > 0
    for k, g in got.items():
        scale = float(expected[k].abs().max())
        torch.testing.assert_close(g, expected[k], rtol=1e-4, atol=1e-5 * scale + 1e-8,
                                   msg=lambda s, k=k: f"{label} {k}: {s}")  # fmt: skip


def layouts(m: Models, ids: Tensor, mask: Tensor, p: int, model: Any) -> dict[str, Any]:
    """The two layouts PPO chooses between: one row per sequence, and packed rows."""
    _, additive = takes_4d_mask(model)
    return {"padded": padded_layout(ids, mask, p), "packed": packed_layout(ids, mask, p, m.pad_id, additive)}


def test_policy_log_probs_and_their_gradients_match_the_plain_forward(models: Models) -> None:
    m = models
    seqs = m.sequences()
    ids, mask, p = m.batch(seqs)
    actor = Actor(m.policy, lean_llama.supports(m.policy))  # as PPO builds it on this device
    expected = torch.cat([plain_logprobs(m.policy, a, b, TEMPERATURE) for a, b in seqs]).detach()  # (N,)
    grads = {}
    for name, lay in layouts(m, ids, mask, p, m.policy).items():
        actor.zero_grad()
        tokens = ids[:, p:][lay.response_mask]  # (N,)
        logprobs = logprobs_from_logits(policy_forward(actor, lay), tokens, TEMPERATURE)  # (N,)
        torch.testing.assert_close(logprobs, expected, **TOL, msg=lambda s, n=name: f"{n}: {s}")
        # a loss that weighs every token differently, so a token read at the wrong place shows in the gradient
        (logprobs * torch.linspace(0.5, 2.0, logprobs.numel())).sum().backward()
        grads[name] = {k: q.grad.clone() for k, q in actor.named_parameters() if q.grad is not None}
    actor.zero_grad()
    reference = torch.cat([plain_logprobs(m.policy, a, b, TEMPERATURE) for a, b in seqs])
    (reference * torch.linspace(0.5, 2.0, reference.numel())).sum().backward()
    plain = {k: q.grad.clone() for k, q in actor.named_parameters() if q.grad is not None}
    actor.zero_grad()
    for name, got in grads.items():
        assert_same_gradients(got, plain, name)


def test_critic_values_and_rewards_match_the_head_on_the_plain_hidden_states(models: Models) -> None:
    m = models
    seqs = m.sequences(seed=1)
    ids, mask, p = m.batch(seqs)
    critic = Critic(m.critic, lean_llama.supports(m.critic))
    with torch.no_grad():
        heads = [plain_head(m.critic, a + b) for a, b in seqs]
        expected_values = torch.zeros(len(seqs), ids.size(1) - p)  # (B, T) V before each response token
        for i, ((a, b), h) in enumerate(zip(seqs, heads, strict=True)):
            expected_values[i, : len(b)] = h[len(a) - 1 : -1]
        expected_rewards = torch.stack([plain_head(m.reward_model, a + b)[-1] for a, b in seqs])  # (B,)
        for name, lay in layouts(m, ids, mask, p, m.critic).items():
            values = response_values(critic, lay)  # (B, T)
            torch.testing.assert_close(values, expected_values, **TOL, msg=lambda s, n=name: f"{n}: {s}")
            rewards = reward_scores(m.reward_model, lay)  # (B,)
            torch.testing.assert_close(rewards, expected_rewards, **TOL, msg=lambda s, n=name: f"{n}: {s}")
        # the judges' and best-of-n's reading: left-padded rows, the head at the last real token
        left = torch.full((len(seqs), max(len(a + b) for a, b in seqs)), m.pad_id)
        left_mask = torch.zeros_like(left)
        for i, (a, b) in enumerate(seqs):
            left[i, left.size(1) - len(a + b) :], left_mask[i, left.size(1) - len(a + b) :] = (
                torch.tensor(a + b),
                1,
            )
        torch.testing.assert_close(sequence_rewards(m.reward_model, left, left_mask), expected_rewards, **TOL)


def test_critic_gradients_match_the_plain_forward(models: Models) -> None:
    """The value loss's gradient through packed and padded rows is the one through each sequence alone."""
    m = models
    seqs = m.sequences(seed=5)
    ids, mask, p = m.batch(seqs)
    critic = Critic(m.critic, lean_llama.supports(m.critic))
    weights = torch.linspace(0.5, 2.0, ids.size(1) - p)  # (T,) a different weight for every response position

    def grads_of(loss: Tensor) -> dict[str, Tensor]:
        critic.zero_grad()
        loss.backward()
        out = {k: q.grad.clone() for k, q in critic.named_parameters() if q.grad is not None}
        critic.zero_grad()
        return out

    plain = grads_of(sum((plain_head(m.critic, a + b)[len(a) - 1 : -1] ** 2 * weights[: len(b)]).sum()
                         for a, b in seqs))  # fmt: skip
    for name, lay in layouts(m, ids, mask, p, m.critic).items():
        assert_same_gradients(grads_of((response_values(critic, lay) ** 2 * weights).sum()), plain, name)


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_reward_trainer_rewards_match_the_head_on_the_plain_hidden_states(
    models: Models, shared_prefix
) -> None:
    """The reward stage's forward on its micro-batches (one right-padded row per completion, or each group's
    prompt once with its completions as branches), unnormalised as it trains."""
    m = models
    seqs = m.sequences(seed=2)
    prompt = seqs[0][0] + seqs[1][0]  # two groups, each of completions that share a prompt
    groups = [[prompt + b for _, b in seqs[:2]], [seqs[2][0] + b for _, b in seqs[2:]]]
    examples = [GroupExample("", ["", ""], g, [(0, 1)], [None], 1.0, None) for g in groups]
    works, additive = takes_4d_mask(m.reward_model)
    if shared_prefix and not works:
        pytest.skip("the reward model's attention takes no 4-D mask: the trainer does not share prefixes")
    batch = reward_collate(examples, m.pad_id, shared_prefix=shared_prefix, additive_mask=additive)
    scorer = RewardForward(m.reward_model, lean_llama.supports(m.reward_model))
    with torch.no_grad():
        rewards = scorer(batch.input_ids, batch.attention_mask, batch.position_ids, batch.reward_at)  # (N,)
        expected = torch.stack([plain_head(m.reward_model, s)[-1] * 1.5 + 0.25 for g in groups for s in g])
    torch.testing.assert_close(rewards, expected, **TOL)


def test_sft_loss_matches_the_plain_forward(models: Models) -> None:
    m = models
    seqs = m.sequences(seed=3)
    examples = [{"input_ids": a + b, "labels": [-100] * len(a) + b} for a, b in seqs]
    batch = collate(examples, m.pad_id)
    loss_fn = NextTokenLoss(m.policy, lean_llama.supports(m.policy))
    with torch.no_grad():
        loss = loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
        expected = -sum(plain_logprobs(m.policy, a, b).sum() for a, b in seqs)
    torch.testing.assert_close(loss, expected, **TOL)


@pytest.mark.parametrize("top_k", [0, 5])
def test_generation_log_probs_are_those_of_a_plain_forward_over_the_sequence(
    models: Models, top_k: int
) -> None:
    """Left-padded prompts of different lengths, rows that stop at different steps (and leave the batch):
    each sampled token's log-prob under softmax(logits / T) is the plain forward's over prompt + response."""
    m = models
    prompts = [a for a, _ in m.sequences(seed=4)] * 2
    eos = int(m.tokenizer.eos_token_id)
    params = SamplingParams(max_new_tokens=10, temperature=TEMPERATURE, top_k=top_k, seed=0)
    gen = generate(m.policy, prompts, params, eos, m.pad_id)
    assert int(gen.response_mask.sum()) > len(prompts)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            n = int(gen.response_mask[i].sum())
            response = gen.response_ids[i, :n].tolist()
            expected = plain_logprobs(m.policy, prompt, response, TEMPERATURE)
            torch.testing.assert_close(
                gen.logprobs[i, :n], expected, **TOL, msg=lambda s, i=i: f"row {i}: {s}"
            )
            assert (gen.logprobs[i, n:] == 0).all()
