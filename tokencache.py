"""Tokenised rows on disk: a chat or preference file is tokenised once into a cache, then read a row at a time.

A cache is a directory of flat arrays (numpy's raw .tofile layout, one value after another):
  tokens.bin         every row's token ids, one row after another (uint16, or uint32 for larger vocabularies)
  masks.bin          one uint8 per token: 1 where the model is trained to write it (assistant content); the
                     loss weight of each token (dataset.token_weights) follows from it and the token's id
  offsets.bin        int64, rows + 1 of them: row i is tokens[offsets[i]:offsets[i + 1]]
  first_trained.bin  int64 per row: the first position >= 1 whose mask is 1 (the row's length if none)
  lines.bin          int64 per row: the line (or hf row) of the source it came from, for error messages
  meta.json          what was read and how (written last)
The directory name holds a hash of the source's content and the tokenizer, so an edited file or another tokenizer
gets a cache of its own. It is built under a temporary name and renamed when complete, so an interrupted build
leaves nothing that looks finished. Rows are read from the files on demand, not kept mapped, so a process holds
the per-row arrays (a few bytes a row) and its batch, never the tokens of the whole file.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from fileio import data_file, write_json

# Bump when the layout or the tokenisation of rows changes: old caches are then ignored (and rebuilt).
# 2: an assistant's <think> and </think> are the special tokens (Tokenizer.encode_reply).
FORMAT = 2
ROW_ARRAYS = {"offsets": np.int64, "first_trained": np.int64, "lines": np.int64}


def file_digest(path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def cache_dir(source: str, tokenizer, kind: str, hf_data_files: str = "", hf_split: str = "train") -> Path:
    """Where the cache of `source` (a file, or hf:<dataset>) tokenised as `kind` lives.

    Beside a file: <its directory>/.cache/<its name>.<kind>-<hash>. An hf: dataset's goes beside the `datasets`
    library's own cache, keyed by its name, data files and split (and the content of data files that are local).
    """
    h = hashlib.blake2b(f"{FORMAT}\0{kind}\0".encode(), digest_size=8)
    h.update(tokenizer.fingerprint())
    if source.startswith("hf:"):
        import datasets.config  # imported here: slow to import and only needed for this source

        h.update(f"{source}\0{hf_data_files}\0{hf_split}".encode())
        for name in hf_data_files.split(","):
            if name and Path(name).is_file():
                h.update(file_digest(name))
        name = source[3:].replace("/", "--")
        return Path(datasets.config.HF_DATASETS_CACHE) / "nanollm" / f"{name}.{kind}-{h.hexdigest()}"
    path = data_file(source)
    h.update(file_digest(path))
    return path.parent / ".cache" / f"{path.name}.{kind}-{h.hexdigest()}"


def first_trained(mask: list[int]) -> int:
    """The first position >= 1 whose mask is 1 (the first trained label after the shift), or len(mask)."""
    try:
        return mask.index(1, 1)
    except ValueError:
        return len(mask)


def write_rows(directory: Path, rows: Iterable[tuple[int, list[int], list[int]]], vocab_size: int,
               meta: Callable[[], dict], flush_tokens: int = 1 << 16) -> None:
    """Write the (line, ids, mask) rows into cache `directory`, atomically, with meta() added to meta.json.

    meta is called after the last row, so it can report what reading the rows found (e.g. rows skipped).
    Rows are written in chunks (flush_tokens tokens or 4096 rows): memory does not grow with the file.
    """
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    dtypes = {"tokens": dtype, "masks": np.uint8, **ROW_ARRAYS}
    with building(directory) as tmp:
        with ExitStack() as stack:
            files = {name: stack.enter_context(open(tmp / f"{name}.bin", "wb")) for name in dtypes}
            buffers = {name: [] for name in dtypes}
            buffers["offsets"].append(0)

            def flush():
                for name, values in buffers.items():
                    np.asarray(values, dtype=dtypes[name]).tofile(files[name])
                    values.clear()

            n_rows = n_tokens = 0
            for line, ids, mask in rows:
                n_rows, n_tokens = n_rows + 1, n_tokens + len(ids)
                buffers["tokens"] += ids
                buffers["masks"] += mask
                buffers["offsets"].append(n_tokens)
                buffers["first_trained"].append(first_trained(mask))
                buffers["lines"].append(line)
                if len(buffers["tokens"]) >= flush_tokens or n_rows % 4096 == 0:
                    flush()
            flush()
        write_json(tmp / "meta.json", {"format": FORMAT, "rows": n_rows, "tokens": n_tokens,
                                       "dtype": np.dtype(dtype).name, **meta()})


def is_complete(directory: Path) -> bool:
    return (directory / "meta.json").exists()


@contextmanager
def building(directory: Path) -> Iterator[Path]:
    """A fresh temporary directory beside `directory` to build a cache in (its meta.json last); renamed to
    `directory` when the block ends, removed if it fails, so that nothing half-built looks complete."""
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished the same cache first: keep theirs
            if not is_complete(directory):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if something failed


def read_array(path: Path, dtype) -> np.ndarray:
    """A memory-mapped flat array (np.memmap refuses an empty file)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


class TokenRows:
    """A cache written by write_rows: `row(i)` reads row i's ids and mask from disk."""

    def __init__(self, directory):
        self.directory = directory = Path(directory)
        self.meta = json.loads((directory / "meta.json").read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        for name, dtype in ROW_ARRAYS.items():
            setattr(self, name, read_array(directory / f"{name}.bin", dtype))
        self._tokens = open(directory / "tokens.bin", "rb")
        self._masks = open(directory / "masks.bin", "rb")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask (int64 arrays) of row i."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        self._tokens.seek(start * self.dtype.itemsize)
        self._masks.seek(start)
        ids = np.frombuffer(self._tokens.read((end - start) * self.dtype.itemsize), dtype=self.dtype)
        mask = np.frombuffer(self._masks.read(end - start), dtype=np.uint8)
        return ids.astype(np.int64), mask.astype(np.int64)
