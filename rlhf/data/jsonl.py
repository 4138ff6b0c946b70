"""JSONL reading with file:line errors, and atomic JSONL/JSON writing."""

from __future__ import annotations

import json
import lzma
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from rlhf.errors import ConfigError, DataError


def iter_jsonl(
    path: str | Path, skipped: list[str] | None = None, opener: Callable[..., IO[bytes]] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for each non-blank line; raise DataError naming file:line on bad JSON or
    bytes that are not UTF-8, or, given a `skipped` list, append that message to it and go on. A UTF-8 byte
    order mark at the start of the file is skipped. `opener` opens the file for reading bytes (a decompressor;
    default: the file as it is)."""
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "not a regular file" if path.exists() else None
        raise DataError(f"{path}: {what or 'file not found'}")
    # decoded line by line, so that bytes that are not UTF-8 are named by their line
    with (opener or Path.open)(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f, path), start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                error = f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)"
            except json.JSONDecodeError as e:
                error = (
                    f"{path}:{lineno}: not valid JSON ({e.msg.removesuffix(' at')} at character {e.pos + 1})"
                )
            else:
                if isinstance(obj, dict):
                    yield lineno, obj
                    continue
                error = f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
            if skipped is None:
                raise DataError(error)
            skipped.append(error)


def _lines(f: IO[bytes], path: Path) -> Iterator[bytes]:
    """The file's lines; a file its decompressor cannot read (not gzip at all, cut short) is a one-line error."""
    try:
        yield from f
    except (OSError, EOFError, lzma.LZMAError) as e:  # gzip's BadGzipFile and bz2's are OSErrors
        raise DataError(f"{path}: cannot decompress it ({e})") from None


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Read every object of a JSONL file, checking that each has the `required` fields."""
    required = list(required)
    rows = []
    for lineno, obj in iter_jsonl(path):
        missing = [k for k in required if k not in obj]
        if missing:
            raise DataError(f"{path}:{lineno}: missing field {missing[0]!r}")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no records (empty file)")
    return rows


def field(path: str | Path, lineno: int, obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """obj[key] checked for presence and type, with a file:line error otherwise."""
    if key not in obj:
        raise DataError(f"{path}:{lineno}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{path}:{lineno}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


def check_output_file(path: str | Path, what: str) -> None:
    """Refuse, before any work, a file output that cannot be written where it is asked for: `path` is a
    directory, or a folder above it is a file. `what` names the setting ("--out", "generate.out")."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a directory; name the file to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what}: {parent} is a file, so {path} cannot be written")
            break


def check_output_dir(path: str | Path, what: str) -> None:
    """Refuse, before any work, an output directory that cannot be made: `path`, or a folder above it, is a
    file. `what` names the setting ("--out")."""
    path = Path(path)
    blocking = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"{what}: {blocking} is a file, so the directory {path} cannot be made")


def umask() -> int:
    """The process's umask: from /proc where Linux gives it, else by setting it and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_mode(directory: bool = False) -> int:
    """The mode a file (or directory) made the usual way would get. `tempfile` makes its files 0600 and its
    directories 0700, which the atomic writes' renames would keep: outputs others on the machine cannot read."""
    return (0o777 if directory else 0o666) & ~umask()


def give_open_modes(folder: Path) -> None:
    """The folder and everything in it get the modes `open_mode` gives: safetensors, like tempfile, writes its
    files 0600."""
    folder.chmod(open_mode(directory=True))
    for path in folder.rglob("*"):
        path.chmod(open_mode(directory=path.is_dir()))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it. A symlink is written
    through, its target replaced; what is no file nor folder (`--out /dev/stdout` on a terminal or a pipe) is
    written to as it is, since renaming over it would replace the link (/dev/stdout itself) and write nowhere."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # exists/is_file follow the links
        with path.open("w", encoding="utf-8") as f:
            f.write(text)
        return
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, open_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Characters JSON leaves raw in text (with ensure_ascii=False) that Python's str.splitlines() and JavaScript
# treat as line breaks: escaped, so one record stays one line for every reader.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl_line(row: Any) -> str:
    """One JSONL record (no newline): UTF-8 text kept readable, line-breaking characters escaped."""
    return json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically; return how many were written."""
    lines = [jsonl_line(r) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_json(path: str | Path, obj: Any, strict: bool = False) -> None:
    """`obj` as JSON, atomically. `strict`: a NaN or infinite number (a mean of nothing) is written as null,
    which every JSON reader takes (Python's NaN is not JSON), for files read by other tools than this one."""
    if strict:
        obj = _finite(obj)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=not strict) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
