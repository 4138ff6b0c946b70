"""rlhf/feedback/importer.py: candidate files become prompts, completions and tasks."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import func, select

from rlhf.errors import DataError
from rlhf.feedback.db import Database
from rlhf.feedback.importer import import_candidates, pair_indices, read_rows
from rlhf.feedback.models import Completion, Project, Task, TaskCompletion
from rlhf.feedback.schemas import CandidateRow, GoldRow


def test_pair_indices() -> None:
    assert pair_indices(2) == [(0, 1)]
    assert pair_indices(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    # K > 4: a cycle, each completion in two comparisons
    assert pair_indices(5) == [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)]


@pytest.mark.parametrize(
    ("kind", "k", "tasks_per_prompt", "size"),
    [("pairwise", 3, 3, 2), ("pairwise", 6, 6, 2), ("ranking", 4, 1, 4), ("rating", 3, 3, 1)],
)
def test_import_creates_tasks(
    db: Database, make_rows, kind: str, k: int, tasks_per_prompt: int, size: int
) -> None:
    rows = [CandidateRow.model_validate(r) for r in make_rows(5, k)]
    with db.session() as s:
        out = import_candidates(s, "demo", rows, task_kind=kind, overlap=2)
        assert (out.prompts, out.completions, out.tasks, out.gold_tasks) == (
            5,
            5 * k,
            5 * tasks_per_prompt,
            0,
        )
        tasks = list(s.scalars(select(Task)))
        assert len(tasks) == 5 * tasks_per_prompt
        assert {t.kind for t in tasks} == {kind}
        assert {t.n_completions for t in tasks} == {size}
        members = s.scalar(select(func.count()).select_from(TaskCompletion))
        assert members == 5 * tasks_per_prompt * size


def test_lineage_is_stored(db: Database, make_rows) -> None:
    rows = [CandidateRow.model_validate(r) for r in make_rows(1, 2)]
    rows[0].completions[1].sampling.__pydantic_extra__["repetition_penalty"] = 1.1  # type: ignore[index]
    with db.session() as s:
        import_candidates(s, "demo", rows)
        comps = list(s.scalars(select(Completion).order_by(Completion.id)))
    assert [c.policy for c in comps] == ["policy-v0", "policy-v1"]
    assert comps[0].sampling == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,
        "max_new_tokens": 32,
        "seed": 0,
    }
    assert comps[1].sampling["repetition_penalty"] == 1.1


def test_reimport_skips_known_prompts_and_identical_pairs(db: Database, make_rows) -> None:
    rows = make_rows(3, 2)
    rows[2]["completions"][1]["text"] = rows[2]["completions"][0]["text"]  # nothing to compare
    parsed = [CandidateRow.model_validate(r) for r in rows]
    with db.session() as s:
        first = import_candidates(s, "demo", parsed)
        again = import_candidates(s, "demo", parsed)
    assert (first.prompts, first.tasks) == (3, 2)
    assert (again.prompts, again.tasks, again.skipped) == (0, 0, 3)


def test_reimport_without_prompt_ids_adds_nothing_but_production_pairs_repeat(
    db: Database, make_rows
) -> None:
    """Rows without a prompt_id (gold rows often) are known again by their prompt and answers: a second import
    of the same file made every task and gold item twice. A production project's pairs are each a user's."""
    rows = make_rows(3, 2)
    for r in rows:
        del r["prompt_id"]
    parsed = [CandidateRow.model_validate(r) for r in rows]
    gold = [GoldRow(prompt="2+2?", completion_a="4", completion_b="5", choice="A")]
    with db.session() as s:
        first = import_candidates(s, "demo", parsed, gold=gold)
        again = import_candidates(s, "demo", parsed, gold=gold)
        assert (first.tasks, first.gold_tasks) == (3, 1)
        assert (again.prompts, again.tasks, again.gold_tasks, again.skipped) == (0, 0, 0, 4)
        s.add(Project(name="production", production=True))
        s.commit()
        ab = [CandidateRow.model_validate({**rows[0], "prompt_id": f"ab-{i}"}) for i in range(2)]
        assert [import_candidates(s, "production", [row]).tasks for row in ab] == [1, 1]


def test_duplicate_rows_and_pairs_in_an_import_make_one_task(db: Database, make_rows) -> None:
    rows = make_rows(2, 3)
    del rows[0]["prompt_id"], rows[1]["prompt_id"]
    rows.append({**rows[0], "completions": list(reversed(rows[0]["completions"]))})  # the same row again
    rows[1]["completions"][2]["text"] = rows[1]["completions"][1]["text"]  # pairs (0,1) and (0,2) the same
    parsed = [CandidateRow.model_validate(r) for r in rows]
    with db.session() as s:
        out = import_candidates(s, "demo", parsed)
        texts = [
            sorted(
                s.scalars(
                    select(Completion.text)
                    .join(TaskCompletion, TaskCompletion.completion_id == Completion.id)
                    .where(TaskCompletion.task_id == t)
                )
            )
            for t in s.scalars(select(Task.id))
        ]
    assert (out.prompts, out.tasks, out.skipped) == (2, 3 + 1, 1)
    assert len({tuple(t) for t in texts}) == len(texts)  # no two tasks compare the same answers


def test_gold_rows_become_gold_tasks(db: Database, make_rows) -> None:
    gold = [GoldRow(prompt="2+2?", completion_a="4", completion_b="5", choice="A")]
    with db.session() as s:
        out = import_candidates(s, "demo", [CandidateRow.model_validate(r) for r in make_rows(2)], gold=gold)
        gold_tasks = list(s.scalars(select(Task).where(Task.is_gold.is_(True))))
    assert (out.tasks, out.gold_tasks) == (2, 1)
    assert [(t.kind, t.gold_choice) for t in gold_tasks] == [("pairwise", "A")]
    with pytest.raises(ValueError, match="completion_a and completion_b are the same text"):
        GoldRow(prompt="g", completion_a="a", completion_b="a", choice="A")  # nobody could answer it right


def test_read_rows_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"prompt": "x", "completions": [{"text": "a"}]})
        + "\n"
        + json.dumps({"prompt": "y"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"c.jsonl:2: completions: Field required"):
        read_rows(path, CandidateRow, 10_000)
    with pytest.raises(DataError, match="over the import limit"):
        read_rows(path, CandidateRow, 10)


@pytest.mark.parametrize(
    "row",
    [
        '{"prompt": "x", "meta": {"score": Infinity}, "completions": [{"text": "a"}, {"text": "b"}]}',
        '{"prompt": "x", "completions": [{"text": "a", "sampling": {"bonus": 1e999}}, {"text": "b"}]}',
        '{"prompt": "x", "completions": [{"text": "a", "sampling": {"extra": [NaN]}}, {"text": "b"}]}',
    ],
)
def test_a_number_json_cannot_carry_is_a_file_and_line_error(tmp_path, row: str) -> None:
    """Free-form fields (meta, sampling's extra keys) refuse NaN and infinities, which Python's JSON reader
    accepts and PostgreSQL's JSON columns and strict readers of the exports do not."""
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "completions": [{"text": "a"}, {"text": "b"}]}) + "\n" + row + "\n"
    )
    with pytest.raises(DataError, match=r"c.jsonl:2: .*finite"):
        read_rows(path, CandidateRow, 10_000)


def test_pairwise_needs_two_completions(api) -> None:
    body = {"candidates": [{"prompt": "p", "completions": [{"text": "only one"}]}]}
    response = api.post("admin", "/api/projects/demo/import", json=body)
    assert response.status_code == 422
    assert "at least 2" in response.json()["detail"][0]["msg"]


def test_imports_at_once_into_a_new_project_add_its_rows_once(db: Database, db_url: str) -> None:
    """Three imports of one file into a project that does not exist yet, from three workers at once (a client
    retrying after a timeout): one adds the rows, the others skip them; none fails on the project's or a
    prompt's unique name (a 500 on PostgreSQL)."""
    rows = [CandidateRow.model_validate({"prompt": f"q{i}", "prompt_id": f"p{i}",
                                         "completions": [{"text": "a"}, {"text": "b"}]}) for i in range(60)]  # fmt: skip
    added: list[int] = []
    errors: list[str] = []

    def import_once() -> None:
        worker = Database(db_url)
        try:
            with worker.session() as s:
                added.append(import_candidates(s, "new", rows).tasks)
        except Exception as e:  # noqa: BLE001 - the test reports whatever a worker raised
            errors.append(repr(e))
        finally:
            worker.dispose()

    threads = [threading.Thread(target=import_once) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and sorted(added) == [0, 0, 60]
