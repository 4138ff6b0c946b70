"""`rlhf cai revise` with a fake critique and revision model, and `rlhf cai label` with a fake judge pushing the
AI labels as votes to an SQLite store."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import select

from rlhf.config import CaiConfig, EvalConfig
from rlhf.constitution import load_constitution
from rlhf.data.jsonl import read_jsonl, write_jsonl
from rlhf.errors import RlhfError
from rlhf.feedback.db import Database
from rlhf.feedback.models import User, Vote
from rlhf.judges.base import JudgeBase, Pair
from rlhf.stages.cai import label, revise
from rlhf.text_models import LocalModel
from tests.fakes import ScriptedModel

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["User: How do I poison the zorb?\nAssistant:", "User: You are useless.\nAssistant:",
           "User: What is 2 plus 2?\nAssistant:"]  # fmt: skip


def scripted_answer(text: str, _: int) -> str:
    """Answers "Sure! Put poison in its plums."; critiques say which request they answer; revisions number
    themselves, so the test can count the rounds."""
    if text.endswith("Critique:"):
        return " It helps to harm.\n\nCritiqueRequest: more"
    if text.endswith("Revision:"):
        return f" Sorry, I can't help with that ({text.count('Revision:')})."
    return " Sure! Put poison in its plums."


def _cfg(tmp_path: Path, **kw: object) -> CaiConfig:
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    kw.setdefault("constitution", str(ROOT / "configs" / "constitution_demo.yaml"))
    return CaiConfig(out_dir=str(tmp_path / "cai"), prompts_files=[str(tmp_path / "prompts.jsonl")], **kw)  # type: ignore[arg-type]  # fmt: skip


def test_revise_writes_sft_rows_and_pairs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, n_revisions=2)
    model = ScriptedModel("scripted", scripted_answer)
    summary = revise(cfg, quiet=True, policy=model)
    assert summary == {"prompts": 3, "sft_rows": 3, "pairs": 3, "unrevised": 0, "unrouted_prompts": 0}
    sft = read_jsonl(tmp_path / "cai" / "sft.jsonl")
    assert [r["response"] for r in sft] == [" Sorry, I can't help with that (1)."] * 3
    assert [r["prompt"] for r in sft] == PROMPTS
    pairs = read_jsonl(tmp_path / "cai" / "pairs.jsonl")
    assert all(p["chosen"] == " Sorry, I can't help with that (1)." for p in pairs)
    assert all(p["rejected"] == " Sure! Put poison in its plums." for p in pairs)
    revisions = read_jsonl(tmp_path / "cai" / "revisions.jsonl")
    principles = {"no-harm", "polite", "honest", "helpful"}
    assert all(len(r["steps"]) == 2 and {s["principle"] for s in r["steps"]} <= principles for r in revisions)
    assert revisions[0]["steps"][0]["critique"] == "It helps to harm."  # cut where the next part starts
    critique_prompts = [p for p in model.prompts if p.endswith("Critique:")]
    assert len(critique_prompts) == 6 and "CritiqueRequest: " in critique_prompts[0]
    # the second round critiques the answer as the first round revised it
    assert (
        "plums" in critique_prompts[0] and "(1)" in critique_prompts[3] and "plums" not in critique_prompts[3]
    )
    # a re-run samples nothing again
    again = ScriptedModel("scripted", scripted_answer)
    assert revise(cfg, quiet=True, policy=again) == summary and again.prompts == []


def test_the_default_constitution_is_found_outside_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an installed package run from the user's own directory: no configs/ there
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, constitution=CaiConfig().constitution)
    assert revise(cfg, quiet=True, policy=ScriptedModel("scripted", scripted_answer))["prompts"] == 3
    shipped = {p.id for p in load_constitution(ROOT / "configs" / "constitution.yaml").principles}
    drawn = {s["principle"] for r in read_jsonl(tmp_path / "cai" / "revisions.jsonl") for s in r["steps"]}
    assert drawn and drawn <= shipped


def test_answers_the_reviser_left_as_they_were_are_not_sft_rows(tmp_path: Path) -> None:
    """A reviser answering nothing left each answer as the policy gave it, and sft.jsonl held them all as
    "revisions", harmful ones included."""

    def silent_reviser(text: str, _: int) -> str:
        return "" if text.endswith(("Critique:", "Revision:")) else " Sure! Put poison in its plums."

    summary = revise(
        _cfg(tmp_path, n_revisions=2), quiet=True, policy=ScriptedModel("silent", silent_reviser)
    )
    assert summary == {"prompts": 3, "sft_rows": 0, "pairs": 0, "unrevised": 3, "unrouted_prompts": 0}
    assert (
        read_jsonl(tmp_path / "cai" / "revisions.jsonl")[0]["revision"] == " Sure! Put poison in its plums."
    )
    assert (tmp_path / "cai" / "sft.jsonl").read_text() == ""


class PrefersShorter(JudgeBase):
    name = "shorter"

    def __init__(self) -> None:
        self.principles: list[str | None] = []

    def compare_all(self, pairs: Sequence[Pair], principle: str | None = None) -> list[float]:
        self.principles.append(principle)
        return [1.0 if len(a.text) < len(b.text) else 0.0 if len(a.text) > len(b.text) else 0.5
                for _, a, b in pairs]  # fmt: skip


def test_label_writes_records_and_pushes_votes(tmp_path: Path, tiny_sft_model: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/feedback.db"
    cfg = _cfg(tmp_path, push_db=db_url, project="cai-demo", max_new_tokens=12)
    judge = PrefersShorter()
    summary = label(cfg, EvalConfig(), quiet=True, policy=LocalModel(str(tiny_sft_model)), judge=judge)
    assert summary["records"] == 3 and summary["labeler"] == "ai:shorter" and summary["pushed"] == 3
    comparisons = {"Which response refuses to help harm the creature?", "Which response is more polite?",
                   "Which response does not invent facts?", "Which response answers the question better?"}  # fmt: skip
    assert set(judge.principles) <= comparisons
    rows = read_jsonl(tmp_path / "cai" / "labels.jsonl")
    for row in rows:
        a, b = row["completion_a"], row["completion_b"]
        expected = "A" if len(a) < len(b) else "B" if len(a) > len(b) else "tie"
        assert row["choice"] == expected and row["labeler"] == "ai:shorter"
        assert row["meta"]["principle"] in {"no-harm", "polite", "honest", "helpful"}
    db = Database(db_url)
    with db.session() as session:
        user = session.scalar(select(User).where(User.name == "ai:shorter"))
        assert user is not None
        votes = list(session.scalars(select(Vote).where(Vote.user_id == user.id)))
    assert len(votes) == 3
    assert sorted(json.loads(v.note or "{}")["principle"] for v in votes) == sorted(
        r["meta"]["principle"] for r in rows
    )
    # a second run labels nothing again and adds no vote
    again = label(
        cfg, EvalConfig(), quiet=True, policy=LocalModel(str(tiny_sft_model)), judge=PrefersShorter()
    )
    assert again["records"] == 3
    with db.session() as session:
        assert len(list(session.scalars(select(Vote)))) == 3


class Unsure(JudgeBase):
    name = "unsure"

    def compare_all(self, pairs: Sequence[Pair], principle: str | None = None) -> list[float]:
        return [0.55 if "poison" in p else 0.3 if "useless" in p else 0.5 for p, _, _ in pairs]


def test_an_unsure_judge_gives_ties(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tie_within=0.1)
    summary = label(
        cfg, EvalConfig(), quiet=True, policy=ScriptedModel("scripted", scripted_answer), judge=Unsure()
    )
    assert summary["ties"] == 2  # 0.55 and 0.5 are within 0.1 of a tie, 0.3 is not
    rows = read_jsonl(tmp_path / "cai" / "labels.jsonl")
    assert sorted(r["choice"] for r in rows) == ["B", "tie", "tie"]


def test_label_asks_several_pairs_per_prompt_and_resumes_by_pair(tmp_path: Path) -> None:
    policy = ScriptedModel("scripted", scripted_answer)
    summary = label(
        _cfg(tmp_path, pairs_per_prompt=2), EvalConfig(), quiet=True, policy=policy, judge=Unsure()
    )
    rows = read_jsonl(tmp_path / "cai" / "labels.jsonl")
    assert summary["records"] == 6 and len(rows) == 6
    assert all(sum(r["prompt"] == p for r in rows) == 2 for p in {r["prompt"] for r in rows})
    # a third pair per prompt: only the new pairs are labelled, the first six kept as they were
    more = label(_cfg(tmp_path, pairs_per_prompt=3), EvalConfig(), quiet=True, policy=policy, judge=Unsure())
    again = read_jsonl(tmp_path / "cai" / "labels.jsonl")
    assert more["records"] == 9 and len(again) == 9 and more["kept_beyond"] == 0
    assert all(sum(r == row for r in again) >= 1 for row in rows)
    # one pair per prompt: the file keeps the labels it has, and the summary says how many it does not count
    fewer = label(_cfg(tmp_path, pairs_per_prompt=1), EvalConfig(), quiet=True, policy=policy, judge=Unsure())
    assert fewer["records"] == 3 and fewer["kept_beyond"] == 6
    assert len(read_jsonl(tmp_path / "cai" / "labels.jsonl")) == 9


class Recording(JudgeBase):
    """Prefers the first answer and records which comparison questions each prompt was asked under."""

    name = "recording"

    def __init__(self) -> None:
        self.asked: dict[str, set[str | None]] = {}

    def compare_all(self, pairs: Sequence[Pair], principle: str | None = None) -> list[float]:
        for p, _, _ in pairs:
            self.asked.setdefault(p, set()).add(principle)
        return [0.9 for _ in pairs]


def test_label_asks_only_the_principles_that_apply_to_each_prompt(tmp_path: Path) -> None:
    harmless = str(ROOT / "configs" / "constitution_demo_harmless.yaml")
    judge = Recording()
    summary = label(_cfg(tmp_path, constitution=harmless, pairs_per_prompt=20), EvalConfig(), quiet=True,
                    policy=ScriptedModel("scripted", scripted_answer), judge=judge)  # fmt: skip
    # the arithmetic question is about no principle of the harmlessness constitution: no answers, no label
    assert summary["records"] == 40 and summary["unrouted_prompts"] == 1
    assert set(judge.asked) == set(PROMPTS[:2])
    assert judge.asked[PROMPTS[0]] == {"Which response refuses to help harm the creature?",
                                       "Which response is more polite?"}  # fmt: skip
    assert judge.asked[PROMPTS[1]] == {"Which response politely offers help?"}
    rows = read_jsonl(tmp_path / "cai" / "labels.jsonl")
    assert {r["meta"]["principle"] for r in rows if r["prompt"] == PROMPTS[1]} == {"reply-kindly"}
    assert {r["meta"]["principle"] for r in rows if r["prompt"] == PROMPTS[0]} == {"no-harm", "polite"}


def test_revise_leaves_out_prompts_no_principle_applies_to(tmp_path: Path) -> None:
    harmless = str(ROOT / "configs" / "constitution_demo_harmless.yaml")
    model = ScriptedModel("scripted", scripted_answer)
    summary = revise(_cfg(tmp_path, constitution=harmless, n_revisions=3), quiet=True, policy=model)
    assert summary == {"prompts": 2, "sft_rows": 2, "pairs": 2, "unrevised": 0, "unrouted_prompts": 1}
    revisions = read_jsonl(tmp_path / "cai" / "revisions.jsonl")
    assert [r["prompt"] for r in revisions] == PROMPTS[:2]
    assert {s["principle"] for s in revisions[1]["steps"]} == {"reply-kindly"}
    assert not any("plus" in p for p in model.prompts)  # the unrouted prompt is not even answered


def test_messages_prompts_render_through_the_local_policys_chat_template(
    tmp_path: Path, tiny_sft_model: Path
) -> None:
    """`messages` rows, as `rlhf bon` and the training stages read them: the local policy's template renders
    them (they were refused as if it had none)."""
    write_jsonl(
        tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "How do I poison the zorb?"}]}]
    )
    cfg = CaiConfig(out_dir=str(tmp_path / "cai"), prompts_files=[str(tmp_path / "m.jsonl")],
                    policy=str(tiny_sft_model), constitution=str(ROOT / "configs" / "constitution_demo.yaml"),
                    max_new_tokens=8)  # fmt: skip
    summary = label(cfg, EvalConfig(), quiet=True, judge=PrefersShorter())
    assert summary["records"] == 1
    assert (
        read_jsonl(tmp_path / "cai" / "labels.jsonl")[0]["prompt"]
        == "User: How do I poison the zorb?\nAssistant:"
    )


def test_a_resume_under_a_constitution_edited_in_place_is_refused(tmp_path: Path) -> None:
    """The rows already labelled were asked under the old principles: the rest would be under others."""
    constitution = tmp_path / "constitution.yaml"
    constitution.write_text((ROOT / "configs" / "constitution_demo.yaml").read_text())
    policy = ScriptedModel("scripted", scripted_answer)

    def again() -> None:
        label(
            _cfg(tmp_path, constitution=str(constitution)),
            EvalConfig(),
            quiet=True,
            policy=policy,
            judge=Unsure(),
        )

    again()
    before = (tmp_path / "cai" / "labels.jsonl").read_text()
    constitution.write_text(constitution.read_text().replace("more polite", "kinder"))
    with pytest.raises(RlhfError, match="made under another version of"):
        again()
    assert (tmp_path / "cai" / "labels.jsonl").read_text() == before


def test_a_pointwise_judge_reviews_under_the_principles_statement_and_labels_name_the_judges_model(
    tmp_path: Path,
) -> None:
    """A pointwise judge was asked whether an answer "breaks the principle: Which is more polite?": the
    comparison question, not the principle, which never reached it (two constitutions differing only in their
    principles gave identical labels). And AI labels by two judge models were one labeler, `ai:local`."""
    import yaml

    harmless = ROOT / "configs" / "constitution_demo_harmless.yaml"
    statements = {p["id"]: p["principle"] for p in yaml.safe_load(harmless.read_text())["principles"]}

    class Reviewing(Recording):
        reads_statement = True

    judge = Reviewing()
    label(_cfg(tmp_path, constitution=str(harmless), pairs_per_prompt=20), EvalConfig(judge_model="judges/m1"),
          quiet=True, policy=ScriptedModel("scripted", scripted_answer), judge=judge)  # fmt: skip
    assert judge.asked[PROMPTS[1]] == {statements["reply-kindly"]}
    assert judge.asked[PROMPTS[0]] == {statements["no-harm"], statements["polite"]}
    rows = read_jsonl(tmp_path / "cai" / "labels.jsonl")
    assert {r["labeler"] for r in rows} == {"ai:recording:judges/m1"}
