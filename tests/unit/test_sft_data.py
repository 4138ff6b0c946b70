"""SFT demonstrations from any data source: the same pairs from JSONL, Parquet and a saved `datasets` folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset

from rlhf.data.jsonl import write_jsonl
from rlhf.errors import DataError
from rlhf.models.loading import load_tokenizer
from rlhf.train.demonstrations import read_demonstrations

ROWS = [
    {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5."}]},
    {"prompt": "User: Hello!\nAssistant:", "response": " Hello! How can I help?"},
]


def table(rows: list[dict[str, object]]) -> Dataset:
    """The rows as one table: a column for every key, null where a row has none (as published datasets hold
    mixed rows)."""
    keys = sorted({k for r in rows for k in r})
    return Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})


def test_every_source_gives_the_same_demonstrations(tmp_path: Path, tiny_sft_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_sft_model))
    write_jsonl(tmp_path / "sft.jsonl", ROWS)
    table(ROWS).to_parquet(str(tmp_path / "sft.parquet"))
    table(ROWS).save_to_disk(str(tmp_path / "saved"))
    expected = read_demonstrations(tmp_path / "sft.jsonl", tokenizer)
    assert expected[1] == (ROWS[1]["prompt"], ROWS[1]["response"])
    assert expected[0][0].endswith("Assistant:")  # the chat row's prompt ends with the generation prompt
    for source in (tmp_path / "sft.parquet", tmp_path / "saved"):
        assert read_demonstrations(source, tokenizer) == expected


def test_a_bad_row_names_its_source_and_row(tmp_path: Path, tiny_sft_model: Path) -> None:
    table([ROWS[1], {"prompt": "User: Hi\nAssistant:", "answer": " Hi."}]).to_parquet(
        str(tmp_path / "bad.parquet")
    )
    with pytest.raises(DataError, match=r"bad\.parquet:2: missing field 'completion' \(or 'response'\)"):
        read_demonstrations(tmp_path / "bad.parquet", load_tokenizer(str(tiny_sft_model)))
