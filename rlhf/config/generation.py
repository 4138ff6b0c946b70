"""Sections of the stages that sample a policy's answers without training it, and judge them: candidates for
labelers (`rlhf generate`) and the simulated panel that labels them, best-of-n (`rlhf bon`), and the A/B
evaluation (`rlhf eval`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rlhf.config.base import AddPadToken, PrecisionSetting, Section, choices_as_text
from rlhf.judges.base import DEFAULT_REVIEW_TEMPLATE, check_review_template
from rlhf.judges.base import DEFAULT_TEMPLATE as DEFAULT_JUDGE_TEMPLATE
from rlhf.judges.base import check_template as check_judge_template

GREEDY_BEST_OF_N = ("temperature 0 samples the one greedy answer {n} times, so there is no best to pick: "
                    "sample at a temperature above 0, or set {n}: 1")  # fmt: skip


class GenerateConfig(Section):
    """`rlhf generate`: K candidate answers per prompt from a policy, for labelers to compare."""

    model: str = Field(
        "runs/sft/final",
        description="policy checkpoint that samples (local dir or hub id); with endpoint, its tokenizer renders "
        "the prompts",
    )
    prompts_file: str = Field(
        "data/demo/rl_prompts.jsonl",
        description="{prompt, prompt_id?} or {messages} rows: a file, saved datasets folder or hub id",
    )
    out: str = Field(
        "runs/candidates.jsonl", description="candidates JSONL written here (the labeling app's import)"
    )
    policy_version: str | None = Field(
        None,
        description="policy name stored with each completion; default: the model dir name, or with "
        "endpoint the version the engine lists (else model@system_fingerprint, else the served name)",
    )
    k: int = Field(4, ge=1, le=16, description="candidate answers per prompt")
    short_k: int = Field(
        0, ge=0, le=4, description="extra candidates per prompt: the first sentence of sampled answer j < short_k "
        "(the empty answer where that is already a candidate), so labels teach the reward model what a "
        "policy that stops early says",
    )  # fmt: skip
    other_k: int = Field(
        0, ge=0, le=4, description="extra candidates per prompt: answers the policy gave to other prompts, drawn "
        "at random with the seed, so labels teach the reward model that an answer must fit its own question",
    )  # fmt: skip
    extra_models: list[str] = Field(
        default_factory=list, description="other policies (e.g. the pretrained model) that answer every prompt "
        "too, extra_k times each, so that labels cover mistakes the main policy rarely makes",
    )  # fmt: skip
    extra_k: int = Field(1, ge=0, le=8, description="answers per prompt from each of extra_models")
    max_prompts: int = Field(0, ge=0, description="use only the first N prompts (0 = all)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0 = greedy)")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    max_new_tokens: int = Field(
        48, gt=0, description="longest answer in tokens; longer ones end with finish_reason 'length'"
    )
    seed: int = Field(0, description="sampling seed; same seed and batch size, same candidates")
    batch_size: int = Field(128, gt=0, description="sequences sampled together (prompts x K)")
    precision: PrecisionSetting = "auto"
    add_pad_token: AddPadToken = True
    endpoint: str | None = Field(
        None, description="sample from an OpenAI-compatible engine at this base URL (vLLM, TGI, SGLang, rlhf "
        "serve), e.g. http://127.0.0.1:8000/v1; model then only renders the prompts (unset = sample locally)",
    )  # fmt: skip
    endpoint_model: str | None = Field(None, description="endpoint: the served model's name; default: model")
    endpoint_api_key_env: str = Field(
        "OPENAI_API_KEY", description="endpoint: environment variable holding the API key (unset = no key)"
    )
    endpoint_concurrency: int = Field(8, ge=1, le=256, description="endpoint: requests in flight at once")
    endpoint_timeout_s: float = Field(300.0, gt=0, description="endpoint: timeout of one request")
    endpoint_retries: int = Field(5, ge=0, description="endpoint: retries on connection errors, 429 and 5xx")
    endpoint_prompt: Literal["tokens", "text"] = Field(
        "tokens", description="endpoint: send each prompt as the token ids the local tokenizer gives it (vLLM, "
        "SGLang, rlhf serve: no second BOS, no other split of the template's special tokens), or as its text "
        "(engines that take no token ids, such as TGI)",
    )  # fmt: skip

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"endpoint must be an http(s) base URL such as http://127.0.0.1:8000/v1, got {value!r}"
            )
        return value


class PanelConfig(Section):
    """The simulated labeler panel: members judge by the demo task's gold utility, with human-like noise."""

    size: int = Field(5, gt=0, description="number of simulated labelers")
    temperature: float = Field(
        1.0, gt=0, description="Bradley-Terry noise: P(A) = sigmoid((u_A - u_B) / temperature)"
    )
    flip_prob: float = Field(
        0.1, ge=0, le=0.5, description="chance that a member reports the opposite of their choice"
    )
    bias_spread: float = Field(
        0.05, ge=0, description="std of each member's length bias w: perceived utility + w * n_words"
    )
    seed: int = Field(0, description="seed of member biases and of every judgement")
    pairs_per_prompt: int = Field(
        0, ge=0, description="label_offline: pairs compared per prompt (0 = all C(K,2))"
    )
    task_kind: Literal["pairwise", "ranking"] = Field(
        "pairwise",
        description="the demo's comparison tasks: pairs of answers, or one ranking of a prompt's K "
        "answers (C(K,2) pairs from one judgement)",
    )


class BonConfig(Section):
    """`rlhf bon`: best-of-n, n answers sampled per prompt, the reward model's favourite kept (rejection sampling)."""

    policy: str = Field(
        "runs/sft/final", description="policy that samples the n answers (local dir or hub id)"
    )
    reward_model: str = Field("runs/reward/final", description="reward model that picks the best (frozen)")
    prompts_file: str = Field(
        "data/demo/rl_prompts.jsonl",
        description="{prompt} or {messages} rows (any source of docs/formats.md)",
    )
    out: str = Field(
        "runs/bon.jsonl",
        description="kept answers as SFT demonstrations {prompt, response, score, scores}, with `messages` (the "
        "prompt's and the answer's turns) where the prompt came as messages",
    )
    n: int = Field(8, ge=1, le=1024, description="answers sampled per prompt")
    max_prompts: int = Field(0, ge=0, description="use only the first N prompts (0 = all)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0 = greedy)")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    max_new_tokens: int = Field(48, gt=0, description="longest answer in tokens")
    no_eos_penalty: float | None = Field(
        -3.0, description="score of an answer that never ends, instead of the RM's (None = RM score)"
    )
    seed: int = Field(0, description="sampling seed")
    batch_size: int = Field(128, gt=0, description="sequences sampled and scored together")
    precision: PrecisionSetting = "auto"
    add_pad_token: AddPadToken = True
    keep_unfinished: bool = Field(
        False,
        description="write the prompts whose best answer never ended too (false: left out and counted, since "
        "SFT would teach the cut answer and an EOS after it)",
    )

    @model_validator(mode="after")
    def _samples_differ(self) -> BonConfig:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(GREEDY_BEST_OF_N.format(n="n"))
        return self


class EvalConfig(Section):
    """`rlhf eval A B`: both policies answer the same held-out prompts; a judge compares them in random order."""

    prompts_file: str = Field(
        "data/demo/eval_prompts.jsonl",
        description="held-out {prompt} or {messages} rows (any source of docs/formats.md)",
    )
    n_prompts: int = Field(300, ge=0, description="prompts to answer (0 = all in the file)")
    redteam_samples: int = Field(
        0, ge=0, description="demo world: answers per held-out red-team attack (`rlhf redteam`'s held-out seeds "
        "under its default split, and redteam_mutations mutations of each) from each policy, scored by the gold "
        "judge: the attack success rate of A and of B (0 = off)",
    )  # fmt: skip
    redteam_mutations: int = Field(4, ge=0, description="mutations of each held-out seed (redteam_samples)")
    judge: Literal["gold", "reward_model", "local", "endpoint", "people"] = Field(
        "gold",
        description="who compares answers: gold = the demo task's hidden utility (demo prompts only), "
        "reward_model, local (a causal LM), endpoint (OpenAI-compatible), people (the labeling app)",
    )
    judge_model: str | None = Field(
        None, description="reward_model/local: checkpoint dir or hub id; endpoint: the served model's name"
    )
    judge_url: str | None = Field(
        None, description="endpoint: base URL of the API, e.g. http://127.0.0.1:8000/v1"
    )
    judge_api_key_env: str = Field(
        "OPENAI_API_KEY", description="endpoint: environment variable holding the API key (unset = no key)"
    )
    judge_template: str = Field(
        DEFAULT_JUDGE_TEMPLATE,
        description="local/endpoint: judging prompt with {prompt}, {first}, {second} and optional {principle}",
    )
    judge_principle: str | None = Field(
        None, description="local/endpoint: the question the judge answers (unset = helpful, honest, harmless)"
    )
    judge_choices: tuple[str, str] = Field(("A", "B"), description="local/endpoint: the two choice tokens")
    judge_both_orders: bool = Field(True, description="local/endpoint: ask each pair in both orders")
    judge_mode: Literal["pairwise", "pointwise"] = Field(
        "pairwise",
        description="local: pairwise = which of two answers is better; pointwise = does each answer break the "
        "principle (yes/no), the pair's preference from the two answers' log-odds",
    )
    judge_review_template: str = Field(
        DEFAULT_REVIEW_TEMPLATE,
        description="local pointwise: review prompt with {prompt}, {response} and optional {principle}",
    )
    judge_review_choices: tuple[str, str] = Field(
        ("yes", "no"), description="local pointwise: the tokens for 'breaks the principle' and 'keeps it'"
    )
    judge_requests_per_s: float = Field(5.0, gt=0, description="endpoint: most requests per second")
    judge_concurrency: int = Field(4, ge=1, le=64, description="endpoint: requests in flight at once")
    judge_timeout_s: float = Field(60.0, gt=0, description="endpoint: timeout of one request")
    judge_retries: int = Field(5, ge=0, description="endpoint: retries on connection errors, 429 and 5xx")
    judge_max_tokens: int = Field(4, gt=0, description="endpoint: longest judge answer in tokens")
    judge_cache: str | None = Field(
        "runs/judge_cache.sqlite",
        description="endpoint: on-disk cache of answers by (model, prompt); unset = off",
    )
    judge_db: str | None = Field(None, description="people: feedback store URL (sqlite:///feedback.db)")
    judge_server: str | None = Field(None, description="people: URL of a running labeling server instead")
    judge_token_env: str = Field(
        "RLHF_FEEDBACK_TOKEN",
        description="people with judge_server: environment variable holding an admin token",
    )
    judge_project: str = Field("eval", description="people: labeling project that holds the evaluation pairs")
    reference: str | None = Field(None, description="model to measure each policy's KL against; unset = none")
    best_of_n: int = Field(
        1,
        ge=1,
        le=1024,
        description="policy A answers best-of-n: n samples, reward_model's favourite (1 = off)",
    )
    reward_model: str | None = Field(None, description="reward model that picks policy A's best-of-n answer")
    max_new_tokens: int = Field(48, gt=0, description="longest answer in tokens")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0 = greedy)")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1.0 = off)")
    batch_size: int = Field(64, gt=0, description="prompts per generation batch")
    seed: int = Field(0, description="seed of sampling (policy B uses seed + 1) and of the A/B order")
    bootstrap: int = Field(2000, gt=0, description="bootstrap resamples for the win rate's 95% interval")
    precision: PrecisionSetting = "auto"
    add_pad_token: AddPadToken = True

    @model_validator(mode="after")
    def _bon_needs_reward_model(self) -> EvalConfig:
        if self.best_of_n > 1 and not self.reward_model:
            raise ValueError("best_of_n > 1 needs reward_model (the model that picks the best answer)")
        if self.best_of_n > 1 and self.temperature == 0:
            raise ValueError(GREEDY_BEST_OF_N.format(n="best_of_n"))
        return self

    @field_validator("judge_choices", "judge_review_choices", mode="before")
    @classmethod
    def _choices_as_text(cls, value: Any) -> Any:
        return choices_as_text(value)

    @model_validator(mode="after")
    def _judge_has_what_it_needs(self) -> EvalConfig:
        if len(set(self.judge_choices)) != 2 or not all(c.strip() for c in self.judge_choices):
            raise ValueError(f"judge_choices must be two different tokens, got {list(self.judge_choices)}")
        if self.judge in ("reward_model", "local", "endpoint") and not self.judge_model:
            raise ValueError(f"judge={self.judge} needs judge_model")
        if self.judge == "endpoint" and not self.judge_url:
            raise ValueError("judge=endpoint needs judge_url (e.g. http://127.0.0.1:8000/v1)")
        if self.judge == "people" and bool(self.judge_db) == bool(self.judge_server):
            raise ValueError("judge=people needs one of judge_db (a database URL) or judge_server (a URL)")
        if self.judge_mode == "pointwise" and self.judge != "local":
            raise ValueError(f"judge_mode=pointwise needs judge=local, got judge={self.judge}")
        if len(set(self.judge_review_choices)) != 2 or not all(c.strip() for c in self.judge_review_choices):
            raise ValueError(
                f"judge_review_choices must be two different tokens, got {list(self.judge_review_choices)}"
            )
        check_judge_template(self.judge_template)
        check_review_template(self.judge_review_template)
        return self
