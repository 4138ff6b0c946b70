from pathlib import Path

import pytest

from rlhf.errors import ConfigError, DataError, read_yaml


def test_read_yaml_reads_yaml_and_json_and_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("ppo:\n  lr: 1.0e-5\n")
    (tmp_path / "w.json").write_text('{"sim-0": 0.5, "sim-1": 2}')
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "a.yaml", "config file") == {"ppo": {"lr": 1e-5}}
    assert read_yaml(tmp_path / "w.json", "weights file") == {"sim-0": 0.5, "sim-1": 2}
    assert read_yaml(tmp_path / "empty.yaml", "config file") is None


def test_read_yaml_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^constitution file not found: {missing}$"):
        read_yaml(missing, "constitution file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles: [\n  - a: 1\n")
    with pytest.raises(DataError) as e:
        read_yaml(bad, "weights file", DataError)
    assert str(e.value).startswith(f"{bad}:2: not valid YAML (") and "\n" not in str(e.value)
    binary = tmp_path / "plot.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    with pytest.raises(ConfigError, match=rf"^{binary}: not valid YAML \(not UTF-8 text at byte 1\)$"):
        read_yaml(binary, "config file")


def test_a_key_given_twice_is_an_error_naming_its_line(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys: a constitution's second `principles:` list replaced its first
    without a word, and so did a config's second `ppo:` section."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("principles:\n  - {id: a}\nprinciples:\n  - {id: b}\n")
    with pytest.raises(
        ConfigError, match=rf"^{twice}:3: not valid YAML \(the key 'principles' is given twice\)$"
    ):
        read_yaml(twice, "constitution file")
    nested = tmp_path / "nested.yaml"
    nested.write_text("ppo:\n  lr: 1.0e-5\n  epochs: 2\n  lr: 3.0e-5\n")
    with pytest.raises(ConfigError, match=r":4: not valid YAML \(the key 'lr' is given twice\)$"):
        read_yaml(nested, "config file")
    (tmp_path / "lists.yaml").write_text("- {id: a}\n- {id: a}\n")  # equal items of a list are not keys
    assert read_yaml(tmp_path / "lists.yaml", "file") == [{"id": "a"}, {"id": "a"}]
    # a merge key brings another mapping's keys in, which the mapping may give again (YAML's override)
    (tmp_path / "merged.yaml").write_text("base: &b {lr: 1, epochs: 2}\nreward:\n  <<: *b\n  lr: 3\n")
    assert read_yaml(tmp_path / "merged.yaml", "config file")["reward"] == {"lr": 3, "epochs": 2}


def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(tmp_path: Path) -> None:
    from rlhf.data.jsonl import check_output_file
    from tests.cli import run_cli

    (tmp_path / "out").mkdir()
    (tmp_path / "a_file").write_text("x")
    check_output_file(tmp_path / "new" / "eval.json", "--out")  # folders that do not exist yet are made
    with pytest.raises(ConfigError, match=r"^generate.out: .*/out is a directory; name the file to write$"):
        check_output_file(tmp_path / "out", "generate.out")
    with pytest.raises(
        ConfigError, match=r"^--out: .*/a_file is a file, so .*/a_file/eval.json cannot be written$"
    ):
        check_output_file(tmp_path / "a_file" / "eval.json", "--out")
    # rlhf eval checks before it loads a policy (these do not exist): it used to fail after judging every pair
    result = run_cli("eval", str(tmp_path / "no_a"), str(tmp_path / "no_b"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --out: {tmp_path / 'out'} is a directory; name the file to write"


def test_an_output_directory_that_is_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    """`rlhf data demo --out notes.txt` (and redteam, cai) ended in a FileExistsError traceback."""
    from tests.cli import run_cli

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for command in (["data", "demo"], ["redteam"], ["cai", "revise"], ["cai", "label"]):
        for out in (notes, notes / "run"):
            result = run_cli(*command, "--out", str(out))
            assert result.returncode == 1, result.stderr
            assert (
                result.stderr.strip()
                == f"error: --out: {notes} is a file, so the directory {out} cannot be made"
            )
    assert notes.read_text() == "mine"


def test_a_jsonl_path_that_is_a_folder_says_so(tmp_path: Path) -> None:
    """`--candidates /tmp` said "file not found" of a folder that is there."""
    from rlhf.data.jsonl import iter_jsonl

    with pytest.raises(DataError, match=rf"^{tmp_path}: a directory, not a file$"):
        list(iter_jsonl(tmp_path))
    with pytest.raises(DataError, match=rf"^{tmp_path / 'none.jsonl'}: file not found$"):
        list(iter_jsonl(tmp_path / "none.jsonl"))


def test_atomic_outputs_get_the_mode_the_umask_gives(tmp_path: Path) -> None:
    """Written through tempfile, every output was 0600 and every model folder 0700 whatever the umask: files
    others on the machine (a team's labelers, a serving account) could not read."""
    import os

    from rlhf.data.jsonl import atomic_write_text
    from rlhf.models.loading import save_pretrained_atomic

    class Saves:
        def save_pretrained(self, folder: Path, **_: object) -> None:
            (Path(folder) / "config.json").write_text("{}")
            weights = Path(folder) / "model.safetensors"
            weights.write_bytes(b"")
            weights.chmod(0o600)  # as safetensors writes its files

    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "votes.jsonl", "{}\n")
        save_pretrained_atomic(tmp_path / "final", Saves())  # type: ignore[arg-type]
    finally:
        os.umask(previous)
    assert (tmp_path / "votes.jsonl").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "final" / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_atomic_outputs_write_through_a_symlink_and_into_a_pipe(tmp_path: Path) -> None:
    """`label export --out /dev/stdout` renamed its temporary file over the /dev/stdout link: nothing reached
    the terminal or pipe, and (as root) /dev/stdout was left a plain file for every later program."""
    import os
    import threading

    from rlhf.data.jsonl import write_jsonl

    (tmp_path / "round3.jsonl").write_text("old\n")
    (tmp_path / "latest.jsonl").symlink_to(tmp_path / "round3.jsonl")
    write_jsonl(tmp_path / "latest.jsonl", [{"a": 1}])
    assert (tmp_path / "latest.jsonl").is_symlink()
    assert (tmp_path / "round3.jsonl").read_text() == '{"a": 1}\n'

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "stdout").symlink_to(tmp_path / "pipe")  # as /dev/stdout -> /proc/self/fd/1 -> a pipe
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append((tmp_path / "pipe").read_text()), daemon=True)
    reader.start()
    write_jsonl(tmp_path / "stdout", [{"b": 2}])
    reader.join(timeout=10)
    assert received == ['{"b": 2}\n'] and (tmp_path / "stdout").is_symlink()


def test_a_path_that_is_not_there_names_the_setting_it_came_from(
    tmp_path: Path, tiny_sft_model: Path
) -> None:
    """`rlhf ppo --set ppo.policy=...` said "runs/reward/final: no such directory": the default of a setting the
    user never set, with nothing naming it."""
    from tests.cli import run_cli

    missing = tmp_path / "nothing" / "here"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    cases = [
        (["ppo", "--set", f"ppo.policy={tiny_sft_model}", "--set", f"ppo.prompts_file={prompts}",
          "--set", f"ppo.reward_model={missing}"], "ppo.reward_model"),
        (["ppo", "--set", f"ppo.policy={tiny_sft_model}", "--set", f"ppo.reward_model={tiny_sft_model}",
          "--set", f"ppo.prompts_file={missing}.jsonl"], "ppo.prompts_file"),
        (["bon", "--set", f"bon.policy={missing}"], "bon.policy"),
        (["bon", "--set", f"bon.policy={prompts}"], "bon.policy"),  # a file where a model directory is due
        (["eval", str(tiny_sft_model), str(missing), "--set", f"eval.prompts_file={prompts}"], "policy B"),
    ]  # fmt: skip
    for args, setting in cases:
        result = run_cli(*args, "--out", str(tmp_path / "out"))
        assert result.returncode == 1, result.stderr
        if args[-1] == f"bon.policy={prompts}":
            assert result.stderr.strip() == f"error: bon.policy: {prompts}: a file, not a model directory"
        else:
            assert result.stderr.strip().startswith(f"error: {setting}: {missing}"), (setting, result.stderr)


def test_a_port_in_use_is_one_line_before_start_up(tmp_path: Path, tiny_sft_model: Path) -> None:
    """A server started on a port another process listens on printed "Application startup complete" (after
    loading its models) and then uvicorn's bind error."""
    import socket

    from tests.cli import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (
            ["serve", str(tiny_sft_model)],
            ["gateway", "--upstream", "http://127.0.0.1:9/v1"],
            ["label", "serve", "--db", f"sqlite:///{tmp_path / 'f.db'}"],
        ):
            result = run_cli(*args, "--port", str(port))
            assert result.returncode == 1, (args, result.stderr)
            assert result.stderr.strip().startswith(f"error: --port {port}: cannot listen on 127.0.0.1:{port}"), (
                args, result.stderr)  # fmt: skip
    assert not (tmp_path / "f.db").exists()  # checked before the store was made
