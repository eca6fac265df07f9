"""Turn a text data set into token files for pretraining: train.bin, val.bin, meta.json and the tokenizer.

    python prepare.py                                    # StoryWorld, the embedded stories (offline), 2048-token BPE
    python prepare.py --source corpus.txt                # your own text, documents separated by blank lines
    python prepare.py --source data.jsonl --text_field content
    python prepare.py --source hf:roneneldan/TinyStories --tokenizer gpt2
    python prepare.py --source hf:jingyaogong/minimind_dataset --hf_data_files pretrain_hq.jsonl

train.bin and val.bin are flat arrays of token ids, every document followed by <|endoftext|>; read them with
np.memmap(path, dtype=meta["dtype"], mode="r"). Documents are streamed and tokenised in batches, so the corpus
never has to fit in memory. A .jsonl line may also hold a chat ({"conversations": [...]} or {"messages": [...]}):
it is tokenised in the ChatML template the chat stages use, special tokens included, so pretraining can mix in
question-answer text (as StoryWorld's pretraining documents do).
"""

from __future__ import annotations

import itertools
import os
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import dataset
from configs import DEFAULT_DATA_DIR, check_options, exit_on_bad_input, parse_args
from fileio import writable_dir, write_json
from storyworld import write_default_dataset
from tokenizer import SPECIAL_TOKENS, Tokenizer


@dataclass
class PrepareConfig:
    """What to tokenise, with which tokenizer, and where to put the result."""

    source: str = field(default="storyworld", metadata={"help": (
        "'storyworld' (the embedded English/Chinese stories, generated offline), a .txt file (documents split by "
        "--txt_separator), a .jsonl file (one JSON object per line, text in --text_field), a .parquet file "
        "(column --text_field), or hf:<dataset> to stream a Hugging Face dataset (needs a network), "
        "e.g. hf:roneneldan/TinyStories")})
    out_dir: str = field(default="", metadata={"help": "output directory; '' = data/<name of the source>"})
    tokenizer: str = field(default="bpe", metadata={"help": (
        "'bpe' (train a byte-level BPE on the training documents), a tiktoken encoding (gpt2, cl100k_base, "
        "o200k_base; downloaded once), or a directory holding a saved tokenizer")})
    vocab_size: int = field(default=2048, metadata={"help": "vocabulary size of the trained BPE (StoryWorld needs "
                                                              "fewer than 2048: its BPE stops merging at about 1900)"})
    tokenizer_train_bytes: int = field(default=100_000_000, metadata={
        "help": "train the BPE on at most this many bytes of text (the first training documents)"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of the documents kept for validation"})
    seed: int = field(default=1337, metadata={"help": "seed of the train/val split and of the StoryWorld data"})
    max_docs: int = field(default=0, metadata={"help": "use only the first N documents; 0 = all"})
    dtype: str = field(default="auto", metadata={
        "help": "token id type in the .bin files: auto (uint16 if the vocabulary fits, else uint32), uint16, uint32"})
    text_field: str = field(default="text", metadata={"help": "the field (.jsonl, hf:) or column (.parquet) "
                                                               "holding the text"})
    txt_separator: str = field(default="blankline", metadata={"help": (
        "how documents are separated in a .txt file: 'blankline' (paragraphs: one or more empty lines), 'line' "
        "(one document per line), or a literal string such as '<|endoftext|>'")})
    hf_data_files: str = field(default="", metadata={
        "help": "hf: only, the file(s) of the dataset repository to read, e.g. pretrain_hq.jsonl"})
    hf_split: str = field(default="train", metadata={"help": "hf: only, the split to read"})

    def __post_init__(self):
        check_options(self, [
            ("val_fraction", 0 < self.val_fraction < 1, "must be > 0 and < 1 (training needs a validation split)"),
            ("vocab_size", self.vocab_size >= 256 + len(SPECIAL_TOKENS), f"must be >= {256 + len(SPECIAL_TOKENS)}"),
            ("tokenizer_train_bytes", self.tokenizer_train_bytes >= 1, "must be >= 1"),
            ("max_docs", self.max_docs >= 0, "must be >= 0 (0 = all)"),
            ("dtype", self.dtype in ("auto", "uint16", "uint32"), "must be auto, uint16 or uint32"),
            ("txt_separator", self.txt_separator != "", "must not be empty")])


# ----------------------------------------------------------------------------------------------- reading documents

# A document is a text, or a chat (a list of {"role", "content"} messages) from a .jsonl file.
Document = str | list[dict]

_TXT_SEPARATORS = {"blankline": r"\n\s*\n", "line": r"\n"}


def read_txt(path, separator: str = "blankline", chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Documents of a UTF-8 text file, split on `separator` ('blankline', 'line' or a literal string)."""
    pattern = re.compile(_TXT_SEPARATORS.get(separator) or re.escape(separator))
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark at the start is skipped
            buffer = ""
            while chunk := f.read(chunk_chars):
                # The last piece may continue in the next chunk, so it waits in the buffer.
                *docs, buffer = pattern.split(buffer + chunk)
                yield from docs
            yield buffer
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_jsonl(path, text_field: str = "text") -> Iterator[Document]:
    """The `text_field` of every line of a JSON Lines file, or the messages of a chat line (one without that field
    but with "conversations" or "messages"); errors name the file and line."""
    for line, row in dataset.read_jsonl(path):
        where = f"{path}:{line}"
        if text_field not in row and ("conversations" in row or "messages" in row):
            yield dataset.to_messages(row, where)
        else:
            yield dataset.text_field(row, text_field, where)


def read_parquet(path, text_field: str = "text", batch_rows: int = 1024) -> Iterator[str]:
    """The `text_field` column of a Parquet file, read in batches of rows; empty (null) cells are skipped."""
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a Parquet file ({e})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)})")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{path}: column '{text_field}' holds {column_type}, not text")
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_field]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def load_hf_documents(name: str, data_files: str | None = None, split: str = "train",
                      text_field: str = "text") -> Iterator[str]:
    """Stream the `text_field` of a Hugging Face dataset, e.g. 'roneneldan/TinyStories', without downloading it
    all first. `name` may also be a builder such as 'json' with local `data_files`."""
    from datasets import load_dataset  # imported here: slow to import and only needed for this source

    for i, row in enumerate(load_dataset(name, data_files=data_files or None, split=split, streaming=True)):
        if text_field not in row:
            raise ValueError(f"{name}: row {i}: no field '{text_field}' (fields: {', '.join(row)})")
        yield row[text_field]


def iter_documents(source: str, text_field: str = "text", txt_separator: str = "blankline",
                   hf_data_files: str = "", hf_split: str = "train", max_docs: int = 0) -> Iterator[Document]:
    """The documents of a .txt/.jsonl/.parquet file or an hf:<dataset>, lazily, texts stripped, empty ones skipped.

    Raises FileNotFoundError or ValueError with a one-line message naming the file when it cannot be read.
    """
    if source.startswith("hf:"):
        texts = load_hf_documents(source[3:], hf_data_files, hf_split, text_field)
    else:
        path = Path(source)
        readers = {".txt": lambda: read_txt(path, txt_separator), ".jsonl": lambda: read_jsonl(path, text_field),
                   ".parquet": lambda: read_parquet(path, text_field)}
        if path.suffix not in readers:
            raise ValueError(f"{source}: unknown file type '{path.suffix}'; "
                             "use a .txt, .jsonl or .parquet file, 'storyworld' or hf:<dataset>")
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file")
        if path.stat().st_size == 0:
            raise ValueError(f"{source}: file is empty")
        texts = readers[path.suffix]()
    docs = (text.strip() if isinstance(text, str) else text for text in texts if text)
    yield from itertools.islice((doc for doc in docs if doc), max_docs or None)


def val_flags(val_fraction: float, seed: int) -> Iterator[bool]:
    """Endless per-document flags, True = validation document.

    Systematic sampling: every (1/val_fraction)-th document from a start chosen by `seed`. Unlike a coin flip per
    document, this gives exactly floor or ceil of n * val_fraction validation documents for any n, without knowing
    n in advance (the documents are streamed). The first document always goes to training.
    """
    phase = random.Random(seed).random() * (1 - val_fraction)
    for i in itertools.count():
        yield int((i + 1) * val_fraction + phase) > int(i * val_fraction + phase)


# ----------------------------------------------------------------------------------------------- tokenising

def resolve_dtype(dtype: str, vocab_size: int) -> str:
    """The numpy dtype name for token ids of a `vocab_size` vocabulary."""
    if dtype == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"dtype must be auto, uint16 or uint32, not {dtype!r}")
    if dtype == "uint16" and vocab_size > 2**16:
        raise ValueError(f"dtype uint16 cannot hold the ids of a {vocab_size}-token vocabulary; "
                         "use --dtype uint32 (or auto)")
    return dtype


def _bpe_training_texts(docs: Iterable[Document], flags: Iterable[bool], max_bytes: int) -> Iterator[str]:
    """Training documents only (the tokenizer never sees validation text), up to `max_bytes` of UTF-8; a chat
    as its roles and contents, the text that the template encodes."""
    n_bytes = 0
    for doc, is_val in zip(docs, flags):
        if is_val:
            continue
        if not isinstance(doc, str):
            doc = "\n".join(f"{m['role']}\n{m['content']}" for m in doc)
        yield doc
        n_bytes += len(doc.encode("utf-8"))
        if n_bytes >= max_bytes:
            return


def load_tokenizer(cfg: PrepareConfig, training_texts: Iterable[str]) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names; 'bpe' trains one on `training_texts`."""
    if cfg.tokenizer == "bpe":
        print(f"training a {cfg.vocab_size}-token BPE on up to {cfg.tokenizer_train_bytes / 1e6:g} MB of text")
        return Tokenizer.train(training_texts, vocab_size=cfg.vocab_size)
    if Path(cfg.tokenizer).is_dir():
        return Tokenizer.from_pretrained(cfg.tokenizer)
    return Tokenizer.from_tiktoken(cfg.tokenizer)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


def encode_documents(tok: Tokenizer, docs: list[Document]) -> list[list[int]]:
    """Token ids of each document: a text as plain text, a chat in the ChatML template."""
    texts = iter(tok.encode_batch([doc for doc in docs if isinstance(doc, str)]))  # the texts in one batch
    return [next(texts) if isinstance(doc, str) else tok.apply_chat_template(doc) for doc in docs]


def write_token_files(docs: Iterable[Document], flags: Iterable[bool], tok: Tokenizer, dtype: str, out_dir: Path,
                      batch_docs: int = 1024) -> dict[str, int]:
    """Tokenise the documents batch by batch into out_dir/train.bin and val.bin; return token and doc counts.

    The files are written under temporary names and renamed only when complete, so an interrupted run never
    leaves a half file that looks finished.
    """
    counts = {"n_train_tokens": 0, "n_val_tokens": 0, "n_train_docs": 0, "n_val_docs": 0}
    final = {split: out_dir / f"{split}.bin" for split in ("train", "val")}
    # The pid keeps processes preparing the same directory at once (one per GPU) out of each other's way.
    tmp = {split: path.with_name(f"{path.name}.tmp{os.getpid()}") for split, path in final.items()}
    try:
        with (open(tmp["train"], "wb") as train_file, open(tmp["val"], "wb") as val_file,
              tqdm(desc="tokenizing", unit=" docs") as progress):
            for batch in _batched(zip(docs, flags), batch_docs):
                ids = {"train": [], "val": []}
                for (_, is_val), doc_ids in zip(batch, encode_documents(tok, [doc for doc, _ in batch])):
                    split = "val" if is_val else "train"
                    ids[split] += doc_ids
                    ids[split].append(tok.eot_id)
                    counts[f"n_{split}_docs"] += 1
                for split, file in (("train", train_file), ("val", val_file)):
                    np.array(ids[split], dtype=dtype).tofile(file)
                    counts[f"n_{split}_tokens"] += len(ids[split])
                progress.update(len(batch))
        for split in final:
            os.replace(tmp[split], final[split])
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)  # only still there if something failed
    return counts


# ----------------------------------------------------------------------------------------------- the pipeline

def default_out_dir(source: str, hf_data_files: str = "") -> Path:
    """data/<name>: storyworld, the file's stem, or the dataset's name (plus the data file's stem)."""
    if source == "storyworld":
        return Path(DEFAULT_DATA_DIR)
    if source.startswith("hf:"):
        name = source.rstrip("/").split("/")[-1].removeprefix("hf:")
        return Path("data") / (f"{name}_{Path(hf_data_files).stem}" if hf_data_files else name)
    return Path("data") / Path(source).stem


def prepare(cfg: PrepareConfig) -> Path:
    """Write train.bin, val.bin, meta.json and the tokenizer for `cfg` into the output directory; return it.

    For the storyworld source the raw files (pretrain.jsonl, sft_*.jsonl, dpo_*.jsonl) go there too.
    """
    if cfg.tokenizer == "bpe":
        resolve_dtype(cfg.dtype, cfg.vocab_size)  # fail now rather than after training the tokenizer
    out_dir = Path(cfg.out_dir or default_out_dir(cfg.source, cfg.hf_data_files))
    source = cfg.source
    if source == "storyworld":
        write_default_dataset(writable_dir(out_dir, "--out_dir"), seed=cfg.seed)
        source = str(out_dir / "pretrain.jsonl")

    def documents() -> Iterator[Document]:  # a fresh pass over the documents
        return iter_documents(source, cfg.text_field, cfg.txt_separator, cfg.hf_data_files, cfg.hf_split,
                              cfg.max_docs)

    if next(documents(), None) is None:  # also raises now, before any output, for a missing or unreadable file
        raise ValueError(f"{source}: no documents found")
    writable_dir(out_dir, "--out_dir")  # before the tokenizer is trained, not after
    training_texts = _bpe_training_texts(documents(), val_flags(cfg.val_fraction, cfg.seed), cfg.tokenizer_train_bytes)
    tok = load_tokenizer(cfg, training_texts)
    dtype = resolve_dtype(cfg.dtype, tok.vocab_size)
    # meta.json, written last, marks a complete directory: remove a stale one before the files change.
    (out_dir / "meta.json").unlink(missing_ok=True)
    counts = write_token_files(documents(), val_flags(cfg.val_fraction, cfg.seed), tok, dtype, out_dir)
    tok.save_pretrained(out_dir)
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": dtype,
            **counts, "n_docs": counts["n_train_docs"] + counts["n_val_docs"], "source": cfg.source,
            "seed": cfg.seed, "val_fraction": cfg.val_fraction}
    write_json(out_dir / "meta.json", meta)
    print(f"{out_dir}: {meta['n_docs']:,} documents, {counts['n_train_tokens']:,} train and "
          f"{counts['n_val_tokens']:,} val tokens ({tok.name}, {dtype})")
    return out_dir


def data_path(data_dir, name: str = "") -> Path:
    """data_dir/name. The default directory (StoryWorld) is prepared here on first use, the one place that
    does it; other data directories come from `python prepare.py`."""
    data_dir = Path(data_dir)
    if data_dir == Path(DEFAULT_DATA_DIR) and not ((data_dir / "train.bin").exists()
                                                    and (data_dir / "meta.json").exists()):
        print(f"preparing the default StoryWorld data set in {data_dir} (first run only)")
        prepare(PrepareConfig(out_dir=str(data_dir)))
    return data_dir / name


def main(argv: list[str] | None = None):
    cfg = parse_args(PrepareConfig, argv, description="Turn a text data set into train.bin/val.bin token files "
                                                      "(default: the embedded StoryWorld stories).")
    with exit_on_bad_input():
        prepare(cfg)


if __name__ == "__main__":
    main()
