"""The package imports on the oldest Python that pyproject.toml's requires-python (>=3.10) lets pip install it on."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "rlhf"
# names the typing module gained after 3.10 (https://docs.python.org/3/library/typing.html); on 3.10 they come
# from typing_extensions, a dependency
NEWER_THAN_3_10 = {
    "Self", "LiteralString", "Never", "TypeVarTuple", "Unpack", "Required", "NotRequired", "assert_never",
    "assert_type", "reveal_type", "dataclass_transform", "get_overloads", "clear_overloads",  # 3.11
    "override", "TypeAliasType",  # 3.12
    "TypeIs", "ReadOnly", "NoDefault", "get_protocol_members", "is_protocol",  # 3.13
}  # fmt: skip


def test_no_typing_name_newer_than_python_3_10() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "typing":
                names = {alias.name for alias in node.names}
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "typing"
            ):
                names = {node.attr}
            else:
                continue
            found += [
                f"{path.relative_to(PACKAGE.parent)}:{node.lineno} typing.{n}"
                for n in names & NEWER_THAN_3_10
            ]
    assert found == []
