"""Packing for pretraining, label masking for SFT, corpus and demonstration errors."""

import json
from pathlib import Path

import datasets
import pytest

from rlhf.errors import DataError
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.stages.pretrain import pack, read_corpus, split_docs
from rlhf.train.demonstrations import read_demonstrations, tokenize_demonstrations
from rlhf.train.lm_loop import IGNORE, collate, n_loss_tokens

CORPUS = ["User: What is 2 plus 3?\nAssistant: 2 plus 3 is 5."] * 40 + [
    "User: Thanks!\nAssistant: You are welcome!"
] * 40


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def test_pack_joins_documents_with_eos_and_cuts_full_blocks() -> None:
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0, block_size=4)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> three full blocks, nothing left over
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert (
        len(pack([[1, 2, 3, 4, 5]], eos_id=0, block_size=4)) == 1
    )  # the tail that does not fill a block is dropped


def test_corpus_formats_and_errors(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("doc one\nline two\n\n\ndoc two\n")
    assert read_corpus(tmp_path / "c.txt") == ["doc one\nline two", "doc two"]
    (tmp_path / "spaces.txt").write_text("doc one\n  \ndoc two\n\t\n\ndoc three\n")
    assert read_corpus(tmp_path / "spaces.txt") == ["doc one", "doc two", "doc three"]
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_corpus(tmp_path / "c.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'text'"):
        read_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="corpus is empty"):
        read_corpus(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="file not found"):
        read_corpus(tmp_path / "nope.txt")


def test_corpus_from_every_dataset_source_reads_its_text_rows(tmp_path: Path) -> None:
    rows = [{"text": "doc one\n\nsame doc", "id": 1}, {"text": "doc two", "id": 2}]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(tmp_path / "c.parquet")
    table.to_csv(tmp_path / "c.csv", index=False)
    table.save_to_disk(tmp_path / "saved")
    (tmp_path / "c.json").write_text(json.dumps(rows))
    for source in ("c.parquet", "c.csv", "saved", "c.json"):
        assert read_corpus(tmp_path / source) == ["doc one\n\nsame doc", "doc two"], source
    datasets.Dataset.from_list([{"text": "a"}, {"body": "b"}]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:2: missing field 'text'"):
        read_corpus(tmp_path / "bad.parquet")


def test_split_is_deterministic_and_disjoint() -> None:
    docs = [f"d{i}" for i in range(100)]
    train, held = split_docs(docs, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held)
    assert split_docs(docs, 0.1, seed=3) == (train, held)


def test_sft_labels_mask_the_prompt_and_end_with_eos(tok) -> None:
    pairs = [("User: Thanks!\nAssistant:", " You are welcome!")]
    (example,), truncated, dropped = tokenize_demonstrations(pairs, tok, max_len=64)
    n_prompt = len(tok(pairs[0][0], add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE] * n_prompt  # prompt tokens carry no loss
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(example["input_ids"][n_prompt:-1]) == " You are welcome!"
    assert (truncated, dropped) == (0, 0)
    assert n_loss_tokens(example) == len(example["input_ids"]) - n_prompt


def test_sft_truncation_is_counted_never_a_crash(tok) -> None:
    long = [
        ("User: Thanks!\nAssistant:", " welcome" * 50),
        ("User: " + "Thanks " * 80 + "\nAssistant:", " ok"),
    ]
    examples, truncated, dropped = tokenize_demonstrations(long, tok, max_len=24)
    assert truncated == 2 and dropped == 1 and len(examples) == 1
    assert len(examples[0]["input_ids"]) == 24


def test_collate_pads_right_with_masked_labels(tok) -> None:
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=1
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_demonstration_formats_and_file_line_errors(tmp_path: Path, tok) -> None:
    path = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "User: Hi\nAssistant:", "response": " Hello!"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plain, chat = read_demonstrations(path, tok)
    assert plain == ("User: Hi\nAssistant:", " Hello!")
    assert chat == ("User: Hi\nAssistant:", " Hello!<|endoftext|>")  # the template's turn, through its EOS
    first, second = tokenize_demonstrations([plain, chat], tok, 64)[0]
    assert first == second  # both train on the same tokens
    path.write_text('{"prompt": "p", "response": "r"}\nnot json\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_demonstrations(path, tok)
    path.write_text('{"prompt": "p", "response": "r\tr"}\n')  # a raw tab inside a string: where it is
    with pytest.raises(
        DataError, match=r"d\.jsonl:1: not valid JSON \(Invalid control character at character 31\)"
    ):
        read_demonstrations(path, tok)
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'completion' \(or 'response'\)"):
        read_demonstrations(path, tok)
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: the last message must be the assistant's answer"):
        read_demonstrations(path, tok)


def test_bytes_that_are_not_utf8_are_named_by_line_and_a_bom_is_skipped(tmp_path: Path, tok) -> None:
    latin1 = "Café?".encode("latin-1")
    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "' + latin1 + b'"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text \(byte 16 of the line\)"):
        read_demonstrations(tmp_path / "d.jsonl", tok)
    (tmp_path / "c.txt").write_bytes(b"doc one\n\n" + latin1 + b"\n")
    with pytest.raises(DataError, match=r"c\.txt:3: not UTF-8 text"):
        read_corpus(tmp_path / "c.txt")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "p", "response": "r"}\r\n')
    assert read_demonstrations(tmp_path / "bom.jsonl", tok) == [("p", "r")]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfdoc one\r\n\r\ndoc two\r\n")
    assert read_corpus(tmp_path / "bom.txt") == ["doc one", "doc two"]


def test_a_demonstration_with_room_for_one_response_token_is_kept(tok) -> None:
    """A prompt one token short of max_len was dropped as if it left no room for a response token."""
    from rlhf.models.tokens import encode_prompts

    prompt = "User: Thanks!\nAssistant:"
    n = len(encode_prompts(tok, [prompt])[0])
    (example,), truncated, dropped = tokenize_demonstrations([(prompt, " welcome")], tok, max_len=n + 1)
    assert (truncated, dropped) == (1, 0) and len(example["input_ids"]) == n + 1
    assert example["labels"][:n] == [IGNORE] * n and example["labels"][n] != IGNORE
    assert tokenize_demonstrations([(prompt, " welcome")], tok, max_len=n)[1:] == (1, 1)


def test_a_folder_of_text_files_is_read_as_each_file_is(tmp_path: Path) -> None:
    """A folder of .txt files went to datasets' text loader: a document per line, a document of several lines
    (code) cut into several, with EOS after each line."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("def f(x):\n    return x\n\nsecond doc\n")
    (tmp_path / "c" / "sub").mkdir()
    (tmp_path / "c" / "sub" / "b.txt").write_text("\ufeffthird\r\nstill third\r\n")
    assert read_corpus(tmp_path / "c") == ["def f(x):\n    return x", "second doc", "third\nstill third"]
    (tmp_path / "c" / "rows.jsonl").write_text('{"text": "a row"}\n')  # other data files: a dataset folder
    with pytest.raises(DataError):
        read_corpus(tmp_path / "c")


def test_a_special_tokens_text_in_a_document_is_text(tmp_path: Path) -> None:
    """A pretraining document mentioning "<|endoftext|>" or the PAD token's text got those tokens: an EOS inside
    it, and PAD trained as a label."""
    from rlhf.models.tokens import encode_prompts

    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=300)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    doc = "write <|pad|> and <|endoftext|> here"
    (ids,) = encode_prompts(tokenizer, [doc], plain_text=True)
    assert tokenizer.pad_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == doc
    # a rendered chat template's special tokens are still tokens
    assert tokenizer.pad_token_id in encode_prompts(tokenizer, [doc])[0]
