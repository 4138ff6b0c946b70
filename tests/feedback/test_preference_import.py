"""rlhf/feedback/preference_import.py: preference records in every layout become one labeler's votes, and
`export --format pairs` gives back the same pairs, whether the records came as JSONL, Parquet or a saved folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from rlhf.data.preferences import (
    PairwiseVote,
    PreferencePair,
    Ranking,
    Rating,
    group_to_pairs,
    ranking_to_group,
    ratings_to_groups,
    read_preferences,
    read_records,
    record_from_json,
    vote_to_pair,
)
from rlhf.errors import DataError
from rlhf.feedback.cli import app
from rlhf.feedback.db import Database
from rlhf.feedback.export import export_records
from rlhf.feedback.models import Prompt, User, Vote
from rlhf.feedback.preference_import import import_preferences
from tests.unit.test_sources import LAYOUTS, write_source

LAYOUTS_HERE = {
    **LAYOUTS,
    "votes": (
        [{"prompt": "Hi", "completion_a": "Go.", "completion_b": "Hello!", "choice": "B", "margin": 0.5},
         {"prompt": "Hi", "completion_a": "Yo", "completion_b": "Hey", "choice": "tie"}],
        "auto", {},
        [PairwiseVote("Hi", "Go.", "Hello!", "B", margin=0.5), PairwiseVote("Hi", "Yo", "Hey", "tie")],
    ),
    "ratings": (  # one labeler's: ratings of two are refused (test_ratings_of_two_labelers_are_refused)
        [{"prompt": "Hi", "completion": "Hello!", "rating": 6, "labeler": "x"},
         {"prompt": "Hi", "completion": "Go away.", "rating": 2, "labeler": "x"}],
        "auto", {},
        [Rating("Hi", "Hello!", 6.0, "x"), Rating("Hi", "Go away.", 2.0, "x")],
    ),
    "ratings of one text twice": (  # counted once, with its mean rating: no pair of a text with itself
        [{"prompt": "Hi", "completion": "Hello!", "rating": 6},
         {"prompt": "Hi", "completion": "Hey.", "rating": 3},
         {"prompt": "Hi", "completion": "Hello!", "rating": 2}],
        "auto", {},
        [Rating("Hi", "Hello!", 6.0), Rating("Hi", "Hey.", 3.0), Rating("Hi", "Hello!", 2.0)],
    ),
}  # fmt: skip


def expected_pairs(records: list[Any]) -> list[Any]:
    """The pairs a labeler's answers in these records stand for, as `export --format pairs` writes them."""
    pairs: list[Any] = []
    # one labeler's ratings of a prompt, compared with the rating difference as margin (as export does)
    ratings = [dataclasses.replace(r, labeler="ann") for r in records if isinstance(r, Rating)]
    for group in ratings_to_groups(ratings, margin=True):
        pairs += group_to_pairs(group)
    for r in records:
        if isinstance(r, Rating):
            continue
        if isinstance(r, Ranking):
            group = ranking_to_group(r)
            pairs += group_to_pairs(group) if group is not None else []
        elif isinstance(r, PairwiseVote):
            pair = vote_to_pair(r)
            pairs += [pair] if pair is not None else []
        else:
            pairs.append(r)
    return [dataclasses.replace(p, labeler=None) for p in pairs]


@pytest.mark.parametrize("layout", list(LAYOUTS_HERE))
def test_imported_preferences_export_as_the_same_pairs(db: Database, tmp_path: Path, layout: str) -> None:
    rows, fmt, columns, records = LAYOUTS_HERE[layout]
    for i, kind in enumerate(("jsonl", "parquet", "saved")):
        folder = tmp_path / kind
        folder.mkdir()
        source = write_source(folder, rows, kind)
        with db.session() as s:
            out = import_preferences(s, f"p{i}", "ann", read_records(source, fmt, None, columns))  # type: ignore[arg-type]
            assert (out.votes, out.tasks, out.already, out.skipped) == (len(records), len(records), 0, [])
            pairs = [record_from_json(r) for r in export_records(s, f"p{i}", "pairs")]
            labelers = {name for (name,) in s.execute(select(User.name).join(Vote, Vote.user_id == User.id))}
            sources = set(s.scalars(select(Vote.source)))
        assert pairs == expected_pairs(records), kind
        assert labelers == {"ann"} and sources == {"import"}


def test_importing_again_adds_nothing_and_repeated_rows_stay(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    pair = '{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5}\n'
    path.write_text(pair * 2)
    with db.session() as s:
        first = import_preferences(s, "demo", "ann", read_records(path))
        again = import_preferences(s, "demo", "ann", read_records(path))
        other = import_preferences(s, "demo", "bob", read_records(path))
        assert (first.votes, again.votes, again.already, other.votes) == (2, 0, 2, 2)
        assert s.scalar(select(func.count()).select_from(Vote)) == 4
        assert s.scalar(select(func.count()).select_from(Prompt)) == 2  # one per import that added votes
        pairs = export_records(s, "demo", "pairs")
    assert pairs == [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5}] * 4


def test_per_axis_judgements_of_imported_votes_are_stored_and_exported(db: Database, tmp_path: Path) -> None:
    """The app's votes export writes each vote's axes; imported again they were dropped without a word, and
    `export --format axes` gave nothing. The project gains the axes the votes carry."""
    from rlhf.feedback.projects import get_project, update_project

    path = tmp_path / "votes.jsonl"
    vote = '{"prompt": "2+2?", "completion_a": "4", "completion_b": "5", "choice": "A", "axes": %s}\n'
    path.write_text(vote % '{"helpful": "A", "honest": "same"}' + vote % '{"harmless": "B"}')
    with db.session() as s:
        import_preferences(s, "demo", "ann", read_records(path))
        assert [(r["axis"], r["choice"]) for r in export_records(s, "demo", "axes")] == [
            ("helpful", "A"), ("honest", "same"), ("harmless", "B")]  # fmt: skip
        import_preferences(s, "other", "ann", [])  # an existing project with axes of its own keeps them first
        update_project(s, "other", axes=["concise"])
        import_preferences(s, "other", "ann", read_records(path))
        assert get_project(s, "demo").axes == ["helpful", "honest", "harmless"]
        assert get_project(s, "other").axes == ["concise", "helpful", "honest", "harmless"]


def test_votes_on_gold_items_are_left_out_and_counted(db: Database, tmp_path: Path) -> None:
    """A votes export marks votes on gold items; they check a labeler, so an import (like training) leaves them
    out rather than turn a wrong gold answer into a preference."""
    path = tmp_path / "votes.jsonl"
    vote = (
        '{"prompt": "2+2?", "completion_a": "4", "completion_b": "5", "choice": "%s", "labeler": "ann"%s}\n'
    )
    path.write_text(vote % ("A", "") + vote % ("B", ', "meta": {"is_gold": true}'))
    with db.session() as s:
        out = import_preferences(s, "demo", "ann", read_records(path))
        assert (out.votes, out.gold) == (1, 1)
        assert export_records(s, "demo", "pairs") == [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]


def test_a_failure_inside_the_import_writes_nothing(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n')
    with db.session() as s:
        s.add(User(name="gone", role="labeler", disabled=True))
        s.commit()
        with pytest.raises(Exception, match="disabled"):
            import_preferences(s, "demo", "gone", read_records(path))
        s.rollback()
        assert s.scalar(select(func.count()).select_from(Prompt)) == 0


def test_rows_the_store_cannot_hold_name_their_row_or_are_skipped(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "x", "rejected": "y"}\n'
        '{"prompt": "", "chosen": "x", "rejected": "y"}\n'
        '{"prompt": "b", "chosen": "x\\u0000", "rejected": "y"}\n'  # a NUL the store refuses
    )
    with db.session() as s:
        with pytest.raises(DataError, match=rf"^{path}:2: prompt: String should have at least 1 character$"):
            import_preferences(s, "demo", "ann", read_records(path))
        out = import_preferences(s, "demo", "ann", read_records(path), skipped=[])
    assert out.votes == 1
    assert [m.split(": ")[0] for m in out.skipped] == [f"{path}:2", f"{path}:3"]


def test_ratings_of_two_labelers_and_a_pair_of_one_text_are_refused(db: Database, tmp_path: Path) -> None:
    """Stored as one labeler's, ann's 6 for "Hello!" and bob's 1 for it were averaged and compared with ann's
    other ratings on one scale, and the pairs export turned ann's preference round. A pair whose two answers
    are one text was stored and exported back as a pair."""
    path = tmp_path / "ratings.jsonl"
    path.write_text('{"prompt": "Hi", "completion": "Hello!", "rating": 6, "labeler": "ann"}\n'
                    '{"prompt": "Hi", "completion": "Go away.", "rating": 2, "labeler": "ann"}\n'
                    '{"prompt": "Hi", "completion": "Go away.", "rating": 9, "labeler": "bob"}\n')  # fmt: skip
    same = tmp_path / "same.jsonl"
    same.write_text(
        '{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "p", "chosen": "a", "rejected": "a"}\n'
    )
    vote = tmp_path / "vote.jsonl"
    vote.write_text('{"prompt": "Hi", "completion_a": " x", "completion_b": " x", "choice": "A"}\n')
    with db.session() as s:
        with pytest.raises(
            DataError, match=rf"^{path}: ratings by 2 labelers \(ann, bob\): stored as --labeler imp"
        ):
            import_preferences(s, "demo", "imp", read_records(path))
        with pytest.raises(DataError, match=rf"^{same}:2: 'chosen' and 'rejected' are the same text"):
            import_preferences(s, "demo", "imp", read_records(same))
        with pytest.raises(
            DataError, match=rf"^{vote}:1: 'completion_a' and 'completion_b' are the same text"
        ):
            import_preferences(s, "demo", "imp", read_records(vote))
        feedback = tmp_path / "feedback.jsonl"  # KTO's: one answer judged alone has no task kind to be
        feedback.write_text(
            '{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "Hi", "completion": "Yo", "label": true}\n'
        )
        with pytest.raises(DataError, match=rf"^{feedback}:2: a feedback record .* dpo.loss=kto"):
            import_preferences(s, "demo", "imp", read_records(feedback))
        assert s.scalar(select(func.count()).select_from(Vote)) == 0


def test_cli_imports_with_skip_bad_rows_and_reports_the_first(db_url: str, tmp_path: Path) -> None:
    rows = [
        {"question": "2+2?", "good": "4", "bad": "5"},
        {"question": "3+3?", "good": "6"},  # no 'bad': a null in the table
        {"question": "Hi", "good": "Hello!", "bad": "Go away."},
    ]
    source = write_source(tmp_path, rows, "parquet")
    runner = CliRunner()
    args = ["import", "--db", db_url, "--project", "demo", "--preferences", source, "--labeler", "ann",
            "--columns", "prompt=question,chosen=good,rejected=bad"]  # fmt: skip
    failed = runner.invoke(app, args)
    assert failed.exit_code != 0 and isinstance(failed.exception, DataError)
    assert (
        str(failed.exception)
        == f"{source}:2: missing column 'bad' (the column mapping reads 'rejected' from it)"
    )
    result = runner.invoke(app, [*args, "--skip-bad-rows"])
    assert result.exit_code == 0, result.output
    assert "demo: 2 votes of ann on 2 tasks" in result.output
    assert f"skipped 1 malformed rows (first: {source}:2: missing column 'bad'" in result.output
    out = tmp_path / "pairs.jsonl"
    exported = runner.invoke(
        app, ["export", "--db", db_url, "--project", "demo", "--format", "pairs", "--out", str(out)]
    )
    assert exported.exit_code == 0, exported.output
    assert read_preferences(out) == [
        PreferencePair("2+2?", "4", "5"),
        PreferencePair("Hi", "Hello!", "Go away."),
    ]


def test_cli_refuses_candidate_options_with_preferences(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n')
    base = ["import", "--db", f"sqlite:///{tmp_path}/f.db", "--project", "demo", "--preferences", str(path)]
    for extra, message in (
        (["--labeler", "ann", "--task-kind", "ranking"], "go with --candidates"),
        ([], "needs --labeler NAME"),
        (["--labeler", "ann", "--candidates", str(path)], "give either --candidates or --preferences"),
        (["--labeler", "ann", "--format", "parquet"], "--format must be one of auto, pairs"),
        (["--labeler", "ann", "--columns", "prompt"], "expected FIELD=COLUMN pairs"),
    ):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code != 0 and message in str(result.exception), (extra, result.exception)
