"""Files: atomic writes (a temp file in the same directory, then a rename, so no reader, and no later run after
a crash, ever sees half a file), and one-line errors for the paths a user gives that cannot work."""

import json
import os
from pathlib import Path


def atomic_write(path, data: str | bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # same directory, so os.replace is a rename
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if something failed before the rename


def write_json(path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path, rows) -> None:
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def writable_dir(path, flag: str) -> Path:
    """path as a directory, made if missing; a one-line ValueError naming `flag` if nothing can be written there
    (checked before any work, rather than found out when the first result is saved)."""
    path = Path(path)
    probe = path / f".write-test{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


def data_file(path) -> Path:
    """path, if it is a file; else a one-line FileNotFoundError (missing) or ValueError (a directory)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected a .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return path
