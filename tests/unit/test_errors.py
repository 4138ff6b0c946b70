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
    assert str(e.value).startswith(f"{bad}: not valid YAML (") and "\n" not in str(e.value)
