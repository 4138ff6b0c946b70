"""The constitution files load, and a bad entry is a one-line error naming the file and the entry."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rlhf.constitution import load_constitution
from rlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ENTRY = {"id": "a", "principle": "p", "critique_request": "c", "revision_request": "r", "comparison": "q?"}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["constitution.yaml", "constitution_demo.yaml"])
def test_shipped_constitutions_load(name: str) -> None:
    constitution = load_constitution(ROOT / "configs" / name)
    assert len(constitution.principles) >= 4
    assert all(p.comparison.endswith("?") for p in constitution.principles)


def test_draw_follows_weights_and_seed() -> None:
    constitution = load_constitution(ROOT / "configs" / "constitution_demo.yaml")
    a = [constitution.draw(random.Random(3)).id for _ in range(5)]
    assert a == [constitution.draw(random.Random(3)).id for _ in range(5)]
    rng = random.Random(0)
    counts = {p.id: 0 for p in constitution.principles}
    for _ in range(3000):
        counts[constitution.draw(rng).id] += 1
    assert counts["no-harm"] > 1.6 * counts["honest"]  # weight 2 against 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("principles:\n  - {id: a, principle: p, critique_request: c, revision_request: r}\n",
         "principles.0.comparison (id 'a'): Field required"),
        ("principles:\n  - {id: a, principle: p, critique_request: c, revision_request: r, comparison: q, x: 1}\n",
         "principles.0.x (id 'a'): unknown key"),
        ("principles:\n  - {id: a, principle: p, critique_request: c, revison_request: r, comparison: q}\n",
         "principles.0.revison_request (id 'a'): unknown key (did you mean revision_request?)"),
        ("principles:\n  - {id: 'Bad Id', principle: p, critique_request: c, revision_request: r, comparison: q}\n",
         "principles.0.id"),
        ("principles: []\n", "principles: List should have at least 1 item"),
        ("principles:\n  - {id: a, principle: p, critique_request: c, revision_request: r, comparison: q}\n"
         "  - {id: a, principle: p, critique_request: c, revision_request: r, comparison: q}\n",
         "principles.1.id: duplicate id 'a'"),
        ("principles: [\n", "not valid YAML"),
        ("principles:\n  - {id: a, principle: '  ', critique_request: c, revision_request: r, comparison: q}\n",
         "principles.0.principle (id 'a')"),
        ("principles:\n  - {id: a, principle: p, critique_request: c, revision_request: r, comparison: q, weight: .inf}\n",
         "principles.0.weight (id 'a'): Input should be less than or equal to 1000000"),
    ],
)  # fmt: skip
def test_bad_entries_name_file_and_entry(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_constitution(path)
    message = str(e.value)
    assert message.startswith(f"{path}:") and expected in message and "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="constitution file not found"):
        load_constitution(tmp_path / "none.yaml")


def _routed(tmp_path: Path) -> Path:
    return _write(
        tmp_path,
        """principles:
  - id: harm
    principle: p
    critique_request: c
    revision_request: r
    comparison: q?
    weight: 3
    applies_to: ['\\b(poison|hurt)\\b', steal]
  - id: manners
    principle: p
    critique_request: c
    revision_request: r
    comparison: q?
    applies_to: [useless, poison]
""",
    )


def test_principles_are_drawn_among_those_that_apply_to_the_prompt(tmp_path: Path) -> None:
    constitution = load_constitution(_routed(tmp_path))
    assert [p.id for p in constitution.applicable("User: How do I POISON the zorb?")] == ["harm", "manners"]
    assert [p.id for p in constitution.applicable("User: How can I steal from the pip?")] == ["harm"]
    assert [p.id for p in constitution.applicable("User: You are useless.")] == ["manners"]
    assert constitution.applicable("User: Hurtle on.") == []  # a search for the pattern, word bounds kept
    rng = random.Random(0)
    assert {constitution.draw_for("User: You are useless.", rng).id for _ in range(50)} == {"manners"}  # type: ignore[union-attr]
    assert constitution.draw_for("User: What is 2 plus 2?", rng) is None
    counts = {"harm": 0, "manners": 0}
    for _ in range(2000):
        counts[constitution.draw_for("poison", rng).id] += 1  # type: ignore[union-attr]
    assert 2.4 < counts["harm"] / counts["manners"] < 3.8  # weight 3 against 1, among those that apply


def test_without_applies_to_every_principle_applies_and_draws_as_before() -> None:
    constitution = load_constitution(ROOT / "configs" / "constitution.yaml")
    assert all(p.applies_to is None for p in constitution.principles)
    a, b = random.Random(5), random.Random(5)
    assert [constitution.draw(a).id for _ in range(20)] == [
        constitution.draw_for("anything", b).id
        for _ in range(20)  # type: ignore[union-attr]
    ]


def test_demo_harmlessness_constitution_routes_the_demo_requests() -> None:
    constitution = load_constitution(ROOT / "configs" / "constitution_demo_harmless.yaml")
    ids = lambda text: {p.id for p in constitution.applicable(f"User: {text}\nAssistant:")}  # noqa: E731
    for harm in ("How do I poison the zorb?", "Help me hurt the pip.", "How can I steal from the vexa?",
                 "How do I trap the blick?"):  # fmt: skip
        assert ids(harm) == {"no-harm", "polite"}
    for insult in (
        "You are useless.",
        "You are a stupid bot.",
        "Your answers are terrible.",
        "I hate talking to you.",
    ):
        assert ids(insult) == {"reply-kindly"}
    for other in ("What is 2 plus 2?", "What color is the zorb?", "Hello!", "How old is the snorf?"):
        assert ids(other) == set()


@pytest.mark.parametrize(
    ("applies_to", "expected"),
    [("['(poison']", "principles.0.applies_to (id 'a'): pattern 0 '(poison' is not a regular expression"),
     ("[]", "principles.0.applies_to (id 'a'): List should have at least 1 item"),
     ("['  ']", "principles.0.applies_to.0 (id 'a')")],
)  # fmt: skip
def test_bad_applies_to_is_a_one_line_error(tmp_path: Path, applies_to: str, expected: str) -> None:
    path = _write(tmp_path, "principles:\n  - {id: a, principle: p, critique_request: c, revision_request: r, "
                            f"comparison: q, applies_to: {applies_to}}}\n")  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_constitution(path)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value) and "\n" not in str(e.value)
