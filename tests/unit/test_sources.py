"""rlhf/data/sources.py and rlhf/data/layouts.py: every preference layout from JSONL, Parquet, a saved `datasets`
folder and a local dataset repository folder reads as the same records; errors name source:row."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path
from typing import Any

import datasets
import pytest

from rlhf.config import load_config
from rlhf.data.jsonl import write_jsonl
from rlhf.data.preferences import (
    ConversationalPair,
    Message,
    PreferencePair,
    Ranking,
    read_preference_groups,
    read_preferences,
    read_records,
)
from rlhf.data.sources import iter_rows, parse_source
from rlhf.errors import ConfigError, DataError

USER, ASSISTANT = "user", "assistant"


def msgs(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def aspects(rating: str) -> dict[str, Any]:
    return {a: {"Rating": rating, "Rationale": "."} for a in ("helpfulness", "honesty", "truthfulness")}


# layout -> (rows as published, format option, column mapping, the records they must read as)
LAYOUTS: dict[str, tuple[list[dict[str, Any]], str, dict[str, str], list[Any]]] = {
    "trl_standard": (
        [{"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}, {"prompt": "Hi", "chosen": "Hey", "rejected": "No"}],
        "auto", {},
        [PreferencePair("2+2?", " 4", " 5"), PreferencePair("Hi", "Hey", "No")],
    ),
    "trl_conversational_explicit": (
        [{"prompt": msgs((USER, "Hi")), "chosen": msgs((ASSISTANT, "Hello!")),
          "rejected": msgs((ASSISTANT, "Go away."))}],
        "auto", {},
        [ConversationalPair([Message(USER, "Hi")], [Message(ASSISTANT, "Hello!")], [Message(ASSISTANT, "Go away.")])],
    ),
    "trl_conversational_implicit": (
        [{"chosen": msgs((USER, "Hi"), (ASSISTANT, "Hey"), (USER, "2+2?"), (ASSISTANT, "4")),
          "rejected": msgs((USER, "Hi"), (ASSISTANT, "Hey"), (USER, "2+2?"), (ASSISTANT, "5"))}],
        "auto", {},
        [ConversationalPair(
            [Message(USER, "Hi"), Message(ASSISTANT, "Hey"), Message(USER, "2+2?")],
            [Message(ASSISTANT, "4")], [Message(ASSISTANT, "5")],
        )],
    ),
    "ultrafeedback_binarized": (
        [{"prompt": "2+2?", "prompt_id": "ab12", "chosen": msgs((USER, "2+2?"), (ASSISTANT, "4")),
          "rejected": msgs((USER, "2+2?"), (ASSISTANT, "5")),
          "messages": msgs((USER, "2+2?"), (ASSISTANT, "4")), "score_chosen": 8.5, "score_rejected": 2.0}],
        "auto", {},
        [ConversationalPair([Message(USER, "2+2?")], [Message(ASSISTANT, "4")], [Message(ASSISTANT, "5")], 6.5)],
    ),
    "ultrafeedback_raw": (
        [{"source": "evol", "instruction": "Name a colour.", "models": ["m1", "m2", "m3"],
          "completions": [
              {"response": "Blue.", "annotations": aspects("5"), "overall_score": 9.0, "model": "m1"},
              {"response": "A car.", "annotations": aspects("1"), "overall_score": 2.0, "model": "m2"},
              {"response": "Red.", "annotations": aspects("5"), "overall_score": 8.0, "model": "m3"},
          ]}],
        "auto", {},
        [Ranking("Name a colour.", ["Blue.", "A car.", "Red."], [1, 2, 1])],
    ),
    "ordered_ranking": (
        [{"prompt": "Hi", "completions": ["Hello!", "Hey.", "Go away."]}],
        "ordered", {},
        [Ranking("Hi", ["Hello!", "Hey.", "Go away."], [1, 2, 3])],
    ),
    "anthropic_hh": (
        [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}],
        "auto", {},
        [PreferencePair("\n\nHuman: Hi\n\nAssistant:", " Hello!", " Go away.")],
    ),
    "mapped_columns": (
        [{"question": "2+2?", "good": " 4", "bad": " 5", "id": 7}],
        "pairs", {"prompt": "question", "chosen": "good", "rejected": "bad"},
        [PreferencePair("2+2?", " 4", " 5")],
    ),
}  # fmt: skip
KINDS = ("jsonl", "parquet", "saved", "repo")


def write_source(tmp_path: Path, rows: list[dict[str, Any]], kind: str) -> str:
    """The rows as a source of one kind: a JSONL file, a Parquet file, a save_to_disk folder, or a dataset
    repository folder (data file + README card) as downloaded from a hub."""
    if kind == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(tmp_path / "data.parquet")
        return str(tmp_path / "data.parquet")
    if kind == "saved":
        datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "saved")
        return str(tmp_path / "saved")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    ds.to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# A preference dataset\n")
    return str(repo)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_reads_the_same_from_every_source(tmp_path: Path, layout: str, kind: str) -> None:
    rows, fmt, columns, expected = LAYOUTS[layout]
    source = write_source(tmp_path, rows, kind)
    assert read_preferences(source, fmt, columns=columns) == expected  # type: ignore[arg-type]


def test_hub_syntax_picks_config_and_split_of_a_local_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for config, split, prompt in (
        ("easy", "train", "1+1?"),
        ("easy", "test", "2+2?"),
        ("hard", "test", "9*9?"),
    ):
        (repo / config).mkdir(parents=True, exist_ok=True)
        row = {"prompt": prompt, "chosen": "right", "rejected": "wrong"}
        (repo / config / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    card = ["---", "configs:"]
    for config, splits in (("easy", ("train", "test")), ("hard", ("test",))):
        card += [f"- config_name: {config}", "  data_files:"]
        card += [f"  - split: {s}\n    path: {config}/{s}.jsonl" for s in splits]
    (repo / "README.md").write_text("\n".join([*card, "---", ""]))

    def prompts(spec: str) -> list[str]:
        return [r.prompt for r in read_preferences(spec)]  # type: ignore[union-attr]

    assert parse_source(f"{repo}:hard@test") == (str(repo), "hard", "test")
    assert prompts(f"{repo}:easy") == ["1+1?"]  # no split given: "train"
    assert prompts(f"{repo}:easy@test") == ["2+2?"]
    assert prompts(f"{repo}:hard") == ["9*9?"]  # no split given, only one: that one
    with pytest.raises(DataError, match="cannot read it as a dataset"):
        read_preferences(f"{repo}:nope")


def test_saved_dataset_dict_needs_a_split_when_it_has_no_train(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    datasets.DatasetDict({"train_prefs": ds, "test_prefs": ds}).save_to_disk(tmp_path / "saved")
    with pytest.raises(
        DataError, match=r"saved: choose a split with @SPLIT, one of: train_prefs, test_prefs$"
    ):
        read_preferences(tmp_path / "saved")
    assert len(read_preferences(f"{tmp_path / 'saved'}@test_prefs")) == 1
    with pytest.raises(
        DataError, match=r"saved@test_pref: no split 'test_pref'; its splits: train_prefs, test_prefs$"
    ):
        read_preferences(f"{tmp_path / 'saved'}@test_pref")


@pytest.mark.parametrize(
    ("content", "cause"),
    [(b"prompt,chosen,rejected\np,\xffa,b\n", r"(?i)utf-?8"),
     (b'prompt,chosen,rejected\np,"a,b\n', "EOF inside string")],
)  # fmt: skip
def test_a_csv_that_cannot_be_read_says_why_in_one_line(
    tmp_path: Path, content: bytes, cause: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """datasets wraps the reason ("An error occurred while generating the dataset") and logs it over lines of
    its own: the error names the file and the reason, and nothing else is printed."""
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_preferences(bad)
    assert str(err.value).startswith(f"{bad}: cannot read it as a dataset (") and re.search(
        cause, str(err.value)
    )
    assert "\n" not in str(err.value) and capfd.readouterr().err == ""


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_malformed_row_names_source_and_row_and_can_be_skipped(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "b", "rejected": "y"},  # in a table: a null, which leaves the column out of this row
        {"prompt": "c", "chosen": "x", "rejected": "y"},
    ]
    source = write_source(tmp_path, rows, kind)
    with pytest.raises(DataError, match=rf"^{source}:2: missing field 'chosen'$"):
        read_preferences(source)
    skipped: list[str] = []
    kept = read_records(source, "auto", skipped)
    assert [where for where, _ in kept] == [f"{source}:1", f"{source}:3"]
    assert skipped == [f"{source}:2: missing field 'chosen'"]
    with caplog.at_level(logging.WARNING):
        assert len(read_preferences(source, skip_bad_rows=True)) == 2
    assert "skipped 1 malformed rows" in caplog.text


def test_implicit_prompt_errors_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "conv.jsonl"
    rows = [
        {"chosen": msgs((USER, "Hi"), (ASSISTANT, "A")), "rejected": msgs((USER, "Yo"), (ASSISTANT, "B"))},
        {"chosen": msgs((USER, "Hi")), "rejected": msgs((USER, "Hi"), (ASSISTANT, "B"))},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped: list[str] = []
    with pytest.raises(DataError, match=r"every row is malformed"):
        read_records(path, "auto", skipped)
    assert skipped == [
        f"{path}:1: 'chosen' and 'rejected' have different prompts (the messages before their last assistant turn)",
        f"{path}:2: field 'chosen' has no assistant turn",
    ]


def test_column_mapping_names_a_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"q": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    with pytest.raises(
        DataError, match=r"q.jsonl:1: missing column 'question' \(the column mapping reads 'prompt'"
    ):
        read_preferences(path, columns={"prompt": "question"})


def test_unreadable_sources_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read it as a dataset \(.+\)$"):
        read_preferences(tmp_path / "broken.parquet")
    with pytest.raises(DataError, match=r"missing.parquet: file not found$"):
        read_preferences(tmp_path / "missing.parquet")
    (tmp_path / "rows.txt").write_text("x\n")
    with pytest.raises(DataError, match=r"rows.txt: unknown file type"):
        read_preferences(tmp_path / "rows.txt")
    (tmp_path / "header.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"header.csv: cannot read it as a dataset \(no rows\)$"):
        read_preferences(tmp_path / "header.csv")
    # a repository folder whose splits have different columns: pyarrow's reason, not only "Couldn't cast"
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    datasets.Dataset.from_list([{"prompt": "a", "messages": [{"role": "user", "content": "x"}]}]).to_parquet(
        repo / "train_sft-00000-of-00001.parquet")  # fmt: skip
    datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]).to_parquet(
        repo / "train_prefs-00000-of-00001.parquet")  # fmt: skip
    with pytest.raises(DataError, match=r"Couldn't cast because column names don't match\)$"):
        read_preferences(f"{tmp_path / 'repo'}@train_prefs")


def test_csv_and_json_files_read_as_pairs(tmp_path: Path) -> None:
    rows = [{"prompt": "2+2?", "chosen": "four", "rejected": "five", "margin": 2}]
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "p.json").write_text(json.dumps(rows))
    for name in ("p.csv", "p.json"):
        assert read_preferences(tmp_path / name) == [PreferencePair("2+2?", "four", "five", 2.0)]
    assert [w for w, _ in iter_rows(tmp_path / "p.csv")] == [f"{tmp_path / 'p.csv'}:1"]


def test_reward_and_dpo_configs_take_layout_and_columns_into_the_groups(tmp_path: Path) -> None:
    source = write_source(tmp_path, LAYOUTS["mapped_columns"][0], "parquet")
    cfg = load_config(
        None, [f"reward.train_file={source}", "reward.format=pairs", "reward.columns={prompt: question, "
               "chosen: good, rejected: bad}", "dpo.format=ultrafeedback_binarized"]
    )  # fmt: skip
    assert cfg.dpo.format == "ultrafeedback_binarized" and cfg.dpo.columns == {}
    groups = read_preference_groups(
        cfg.reward.train_file, cfg.reward.format, None, columns=cfg.reward.columns
    )
    assert [(g.prompt, g.completions, g.pairs) for g in groups] == [("2+2?", [" 4", " 5"], [(0, 1)])]
    with pytest.raises(ConfigError, match="format"):
        load_config(None, ["reward.format=parquet"])


def test_messages_with_fields_of_other_messages_read_from_a_table(tmp_path: Path) -> None:
    named = [{"role": ASSISTANT, "content": "Hey", "name": "bot"}]
    rows = [
        {
            "prompt": msgs((USER, "Hi")),
            "chosen": msgs((ASSISTANT, "Hey")),
            "rejected": msgs((ASSISTANT, "No")),
        },
        {"prompt": msgs((USER, "Yo")), "chosen": named, "rejected": msgs((ASSISTANT, "No"))},
    ]
    source = write_source(tmp_path, rows, "parquet")  # Arrow gives row 1's messages row 2's 'name', as null
    skipped: list[str] = []
    records = [r for _, r in read_records(source, "auto", skipped)]
    assert records == [
        ConversationalPair([Message(USER, "Hi")], [Message(ASSISTANT, "Hey")], [Message(ASSISTANT, "No")])
    ]
    assert len(skipped) == 1 and skipped[0].startswith(
        f"{source}:2: chosen[0] should be"
    )  # a real extra field


def test_compressed_hh_file_reads_as_pairs(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl.gz"
    rows = LAYOUTS["anthropic_hh"][0]
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert read_preferences(path) == LAYOUTS["anthropic_hh"][3]


def test_a_missing_folder_next_to_real_ones_is_not_taken_for_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert parse_source("data/saved_prefs") == ("data/saved_prefs", None, None)  # shaped like OWNER/NAME
    with pytest.raises(DataError, match=r"^data/saved_prefs: file not found$"):
        read_preferences("data/saved_prefs")  # a local typo: no hub look-up
    # an empty setting (`--set eval.prompts_file=`) is not the working directory read as a dataset folder
    with pytest.raises(
        DataError, match=r"^an empty data path: name a file, a dataset folder or a hub dataset$"
    ):
        read_preferences("")


def test_an_ultrafeedback_row_whose_scores_contradict_its_labels_is_refused(tmp_path: Path) -> None:
    """score_chosen below score_rejected: a margin of the wrong sign would train the pair backwards."""
    row = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "score_chosen": 2.0, "score_rejected": 8.5}
    source = tmp_path / "uf.jsonl"
    write_jsonl(source, [row])
    with pytest.raises(DataError, match=r"uf.jsonl:1: score_chosen \(2.0\) is below score_rejected \(8.5\)"):
        read_preferences(source)


def test_a_folder_of_two_formats_or_a_split_a_saved_dataset_lacks_is_an_error(tmp_path: Path) -> None:
    """`datasets` reads a folder as one format, leaving the other files out without a word; and a saved folder
    of one dataset gave all of its rows for any split asked (train@train and train@test, the same rows)."""
    import datasets

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text(json.dumps({"prompt": "1+1?", "chosen": "2", "rejected": "3"}) + "\n")
    datasets.Dataset.from_list([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]).to_parquet(
        mixed / "b.parquet"
    )
    with pytest.raises(
        DataError, match=r"the folder mixes json, parquet files, and a folder is read as one format"
    ):
        read_preferences(str(mixed))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]).save_to_disk(str(saved))
    assert [r.prompt for r in read_preferences(f"{saved}@train")] == ["2+2?"]  # type: ignore[union-attr]
    with pytest.raises(DataError, match=r"no split 'test'; it holds one dataset \(split 'train'\)"):
        read_preferences(f"{saved}@test")


def test_a_folder_without_data_files_says_so(tmp_path: Path) -> None:
    """An empty folder (or one of images) was "cannot read it as a dataset (FileNotFoundError: Couldn't resolve
    pattern ** with resolver functools.partial(...))"."""
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "plot.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=rf"^{empty}: no data files in this folder"):
        list(iter_rows(str(empty)))


def test_json_rows_keep_their_own_types_and_errors_name_the_row(tmp_path: Path) -> None:
    """datasets' json loader wrote a column whose types differ between rows as JSON text: every good row's
    answer came back quoted and the bad row's number as "5", and training ran on that."""
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": "bad"} for i in range(5)]
    rows.append({"prompt": "p5", "chosen": 5, "rejected": "bad"})
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "mixed.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    (repo / "train.json").write_text(json.dumps(rows))
    (repo / "test.json").write_text(json.dumps(rows[:2]))
    for source, where in (("mixed.json", "mixed.json"), ("mixed.jsonl.gz", "mixed.jsonl.gz"),
                          ("repo", "repo/data/train.json")):  # fmt: skip
        with pytest.raises(DataError, match=rf"{where}:6: field 'chosen' should be str, got int$"):
            read_preferences(tmp_path / source)
    assert read_preferences(f"{tmp_path / 'repo'}@test") == [PreferencePair("p0", "good 0", "bad"),
                                                             PreferencePair("p1", "good 1", "bad")]  # fmt: skip
    # a plain pair and a conversational one in one array, as in one JSONL file
    mixed = [{"prompt": "2+2?", "chosen": " 4", "rejected": " 5"},
             {"prompt": msgs((USER, "Hi")), "chosen": msgs((ASSISTANT, "Hello!")), "rejected": msgs((ASSISTANT, "Go"))}]  # fmt: skip
    (tmp_path / "both.json").write_text(json.dumps(mixed))
    records = [r for _, r in read_records(tmp_path / "both.json", "auto", None)]
    assert records[0] == PreferencePair("2+2?", " 4", " 5")
    assert records[1] == ConversationalPair([Message(USER, "Hi")], [Message(ASSISTANT, "Hello!")],
                                            [Message(ASSISTANT, "Go")])  # fmt: skip
    # one object per line in a .json file, and what is not rows
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert [w for w, _ in iter_rows(tmp_path / "lines.json")] == [
        f"{tmp_path / 'lines.json'}:{i}" for i in (1, 2)
    ]
    (tmp_path / "object.json").write_text(json.dumps({"data": rows[:2]}, indent=1))
    with pytest.raises(DataError, match=r"object.json: one JSON object, not rows"):
        read_preferences(tmp_path / "object.json")
    (tmp_path / "broken.json").write_text('[{"prompt": "a",\n "chosen": }]')
    with pytest.raises(DataError, match=r"broken.json:2: not valid JSON"):
        read_preferences(tmp_path / "broken.json")


def test_a_csv_cell_reading_none_or_na_is_that_text(tmp_path: Path) -> None:
    """pandas reads "None", "NA", "null", "N/A" and "nan" as missing: a row whose answer was "None" was
    refused as missing it (or dropped with skip_bad_rows). Only an empty cell is missing."""
    (tmp_path / "na.csv").write_text("prompt,chosen,rejected\np,None,NA\nq,null,N/A\n")
    assert read_preferences(tmp_path / "na.csv") == [PreferencePair("p", "None", "NA"),
                                                     PreferencePair("q", "null", "N/A")]  # fmt: skip
    (tmp_path / "empty.csv").write_text("prompt,chosen,rejected\np,,b\n")
    with pytest.raises(DataError, match=r"empty.csv:1: missing field 'chosen'$"):
        read_preferences(tmp_path / "empty.csv")


def test_a_negative_margin_or_a_score_given_as_text_is_a_row_error(tmp_path: Path) -> None:
    """Training took a margin of -2 (a looser loss than none) where the labeling store refused it; an
    ultrafeedback_binarized row whose scores were strings lost its margin and its contradiction check."""
    (tmp_path / "neg.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -2}\n')
    with pytest.raises(DataError, match=r"neg.jsonl:1: field 'margin' should be 0 or more"):
        read_preferences(tmp_path / "neg.jsonl")
    row = {"prompt": "Hi", "chosen": "a", "rejected": "b", "score_chosen": "8", "score_rejected": 7}
    (tmp_path / "uf.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"uf.jsonl:1: field 'score_chosen' should be a number, got str"):
        read_preferences(tmp_path / "uf.jsonl")
    (tmp_path / "zero.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0}\n')
    assert read_preferences(tmp_path / "zero.jsonl") == [PreferencePair("p", "a", "b", 0.0)]


def test_a_column_mapping_is_applied_at_once(tmp_path: Path) -> None:
    """Renamed one column at a time, a swap read 'missing field chosen', and two fields reading one column
    said that column was missing."""
    (tmp_path / "swap.jsonl").write_text('{"prompt": "p", "chosen": "worse", "rejected": "better", "x": 1}\n')
    swapped = read_preferences(tmp_path / "swap.jsonl", columns={"chosen": "rejected", "rejected": "chosen"})
    assert swapped == [PreferencePair("p", "better", "worse")]


def test_a_compressed_file_that_cannot_be_decompressed_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "plain.jsonl.gz").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')  # not gzip
    with pytest.raises(DataError, match=r"plain.jsonl.gz: cannot decompress it \(Not a gzipped file"):
        read_preferences(tmp_path / "plain.jsonl.gz")
    whole = gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 50)
    for name in ("cut.jsonl.gz", "cut.json.gz"):
        (tmp_path / name).write_bytes(whole[: len(whole) // 2])
        with pytest.raises(DataError, match=rf"{name}: cannot (decompress|read) it"):
            read_preferences(tmp_path / name)


def test_a_json_array_entry_that_is_no_object_can_be_skipped(tmp_path: Path) -> None:
    """With skip_bad_rows, an array entry that is not an object (a null left by an export) stopped the read,
    where the same line of a JSONL file is skipped and counted."""
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([{"prompt": "a", "chosen": "x", "rejected": "y"}, None, "b"]))
    with pytest.raises(DataError, match=rf"^{path}:2: expected a JSON object, got NoneType$"):
        read_preferences(path)
    skipped: list[str] = []
    assert read_records(path, "auto", skipped) == [(f"{path}:1", PreferencePair("a", "x", "y"))]
    assert skipped == [
        f"{path}:2: expected a JSON object, got NoneType",
        f"{path}:3: expected a JSON object, got str",
    ]
