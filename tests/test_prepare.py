"""prepare.py: documents in, token files out, losslessly; bad input gives one clear line."""

import functools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
import storyworld
from prepare import PrepareConfig
from tokenizer import Tokenizer

# English and Chinese stories, plus a document spanning lines, to check that text survives the round trip.
DOCS = storyworld.generate_stories(99, seed=0) + ["First line.\nSecond line of the same document."]


def _write(path, docs=DOCS):
    """`docs` as a file of the type `path`'s suffix names."""
    if path.suffix == ".txt":
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": docs}), path, row_group_size=32)  # several row groups to stream
    return path


def _prepare(tmp_path, source, **overrides):
    cfg = PrepareConfig(**{"source": str(source), "out_dir": str(tmp_path / "out"), "vocab_size": 400, **overrides})
    return prepare.prepare(cfg)


def _decode_split(out_dir, split):
    """The documents of train.bin or val.bin, read back as the trainer reads them."""
    meta = json.loads((out_dir / "meta.json").read_text())
    tok = Tokenizer.from_pretrained(out_dir)
    ids = np.memmap(out_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
    assert len(ids) == 0 or ids[-1] == tok.eot_id  # every document ends with <|endoftext|>
    ends = np.flatnonzero(ids == tok.eot_id)
    return [tok.decode(ids[start:end]) for start, end in zip([0, *(ends[:-1] + 1)], ends)]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "hf"])
def test_documents_round_trip_through_the_token_files(tmp_path, kind, request):
    if kind == "hf":  # the datasets code path, offline: the 'json' builder on a local file
        request.getfixturevalue("hf_cache")
        source = "hf:json"
        extra = {"hf_data_files": str(_write(tmp_path / "docs.jsonl"))}
    else:
        source, extra = _write(tmp_path / f"docs.{kind}"), {}
    out = _prepare(tmp_path, source, **extra)

    train, val = _decode_split(out, "train"), _decode_split(out, "val")
    flags = prepare.val_flags(0.1, 1337)
    expected_val = [doc for doc, is_val in zip(DOCS, flags) if is_val]
    assert train == [doc for doc in DOCS if doc not in expected_val]
    assert val == expected_val and len(val) == 10  # 9:1 by document

    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_pretrained(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size <= 400
    assert meta["tokenizer"] == tok.name and meta["source"] == str(source) and meta["seed"] == 1337
    assert (meta["n_docs"], meta["n_train_docs"], meta["n_val_docs"]) == (100, 90, 10)
    assert meta["n_train_tokens"] == (out / "train.bin").stat().st_size // 2
    assert meta["n_val_tokens"] == (out / "val.bin").stat().st_size // 2
    assert not list(out.glob("*.tmp*"))


def test_chat_lines_are_tokenised_in_the_chat_template(tmp_path):
    chats = storyworld.generate_lessons(30, seed=0)
    rows = [{"text": d} for d in DOCS[:30]] + chats
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = _prepare(tmp_path, path)
    tok = Tokenizer.from_pretrained(out)
    rendered = ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in c["conversations"])
                for c in chats]
    assert sorted(_decode_split(out, "train") + _decode_split(out, "val")) == sorted(DOCS[:30] + rendered)
    ids = np.concatenate([np.fromfile(out / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")])
    # real special tokens, one <|im_start|> per message, not their text spelled out in ordinary tokens
    assert (ids == tok.im_start_id).sum() == sum(len(c["conversations"]) for c in chats)


def test_the_split_depends_on_the_seed_and_keeps_its_share():
    for n in (1, 7, 100, 1234):
        for seed in range(5):
            flags = [f for _, f in zip(range(n), prepare.val_flags(0.1, seed))]
            assert not flags[0] and sum(flags) in (n // 10, n // 10 + 1)
    first = [f for _, f in zip(range(100), prepare.val_flags(0.1, 0))]
    assert any(first != [f for _, f in zip(range(100), prepare.val_flags(0.1, seed))] for seed in range(1, 5))


@pytest.mark.parametrize("separator, joiner", [("blankline", "\n\n  \n"), ("line", "\n"),
                                               ("<|endoftext|>", "<|endoftext|>")])
def test_txt_separators_across_read_chunks(tmp_path, separator, joiner):
    docs = [d.replace("\n", " ") for d in DOCS[:20]]
    path = tmp_path / "docs.txt"
    path.write_text(joiner.join(docs), encoding="utf-8")
    read = prepare.read_txt(path, separator, chunk_chars=7)  # tiny chunks: separators get cut in two
    assert [d.strip() for d in read if d.strip()] == docs


def test_max_docs_and_a_saved_tokenizer(tmp_path):
    first = _prepare(tmp_path, _write(tmp_path / "docs.jsonl"))
    out = prepare.prepare(PrepareConfig(source=str(tmp_path / "docs.jsonl"), out_dir=str(tmp_path / "again"),
                                        tokenizer=str(first), max_docs=20))
    assert json.loads((out / "meta.json").read_text())["n_docs"] == 20
    assert _decode_split(out, "train") + _decode_split(out, "val") != []
    assert Tokenizer.from_pretrained(out).name == Tokenizer.from_pretrained(first).name


def test_load_hf_documents_streams_a_local_builder(tmp_path, hf_cache):
    path = _write(tmp_path / "docs.jsonl")
    assert list(prepare.load_hf_documents("json", data_files=str(path), text_field="text")) == DOCS
    with pytest.raises(ValueError, match="no field 'story'"):
        next(prepare.load_hf_documents("json", data_files=str(path), text_field="story"))


def test_storyworld_source_and_the_default_data_on_first_use(tmp_path, monkeypatch):
    small = functools.partial(storyworld.write_default_dataset, n_lessons=150, n_stories=50, n_chats=20, n_pairs=20,
                              n_val=5)
    monkeypatch.setattr(prepare, "write_default_dataset", small)
    monkeypatch.chdir(tmp_path)
    assert prepare.data_path("data/other", "x.jsonl") == prepare.Path("data/other/x.jsonl")  # never prepared here
    assert not (tmp_path / "data").exists()
    out = prepare.data_path("data/storyworld")
    for name in ("train.bin", "val.bin", "meta.json", "pretrain.jsonl", "sft_train.jsonl", "sft_val.jsonl",
                 "dpo_train.jsonl", "dpo_val.jsonl"):
        assert (out / name).exists(), name
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "storyworld" and meta["n_docs"] == 200
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert prepare.data_path("data/storyworld", "sft_val.jsonl") == out / "sft_val.jsonl"  # there: nothing to do
    assert (out / "train.bin").stat().st_mtime_ns == stamp


def test_default_out_dir():
    assert prepare.default_out_dir("storyworld") == prepare.Path("data/storyworld")
    assert prepare.default_out_dir("corpus/my_books.txt") == prepare.Path("data/my_books")
    assert prepare.default_out_dir("hf:roneneldan/TinyStories") == prepare.Path("data/TinyStories")
    assert prepare.default_out_dir("hf:jingyaogong/minimind_dataset", "pretrain_hq.jsonl") == \
        prepare.Path("data/minimind_dataset_pretrain_hq")


def test_bad_input_gives_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt: no such file"):
        _prepare(tmp_path, tmp_path / "missing.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: file is empty"):
        _prepare(tmp_path, tmp_path / "empty.jsonl")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match=r"blank\.txt: no documents found"):
        _prepare(tmp_path, tmp_path / "blank.txt")
    with pytest.raises(ValueError, match=r"unknown file type '\.csv'"):
        _prepare(tmp_path, tmp_path / "data.csv")

    lines = [json.dumps({"text": d}) for d in DOCS[:20]]
    (tmp_path / "broken.jsonl").write_text("\n".join(lines[:4] + ["{not json"] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:5: not valid JSON \("):
        _prepare(tmp_path, tmp_path / "broken.jsonl")
    (tmp_path / "data.jsonl").write_text("\n".join(lines[:16] + ['{"txt": "typo"}'] + lines[16:]) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:17: no field 'text'$"):
        _prepare(tmp_path, tmp_path / "data.jsonl")

    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text$"):
        _prepare(tmp_path, tmp_path / "latin1.jsonl")

    pq.write_table(pa.table({"story": DOCS}), tmp_path / "docs.parquet")
    with pytest.raises(ValueError, match=r"docs\.parquet: no column 'text' \(columns: story\)"):
        _prepare(tmp_path, tmp_path / "docs.parquet")

    with pytest.raises(ValueError, match="uint16 cannot hold the ids of a 70000-token vocabulary"):
        _prepare(tmp_path, _write(tmp_path / "docs.txt"), vocab_size=70_000, dtype="uint16")


def test_command_line_prints_the_error_instead_of_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*nope\.jsonl: no such file$"):
        prepare.main(["--source", str(tmp_path / "nope.jsonl"), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
