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
        ("principles:\n  - {id: 'Bad Id', principle: p, critique_request: c, revision_request: r, comparison: q}\n",
         "principles.0.id"),
        ("principles: []\n", "principles: List should have at least 1 item"),
        ("principles:\n  - {id: a, principle: p, critique_request: c, revision_request: r, comparison: q}\n"
         "  - {id: a, principle: p, critique_request: c, revision_request: r, comparison: q}\n",
         "principles.1.id: duplicate id 'a'"),
        ("principles: [\n", "not valid YAML"),
        ("principles:\n  - {id: a, principle: '  ', critique_request: c, revision_request: r, comparison: q}\n",
         "principles.0.principle (id 'a')"),
    ],
)  # fmt: skip
def test_bad_entries_name_file_and_entry(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_constitution(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="constitution file not found"):
        load_constitution(tmp_path / "none.yaml")
