"""Chat records in every supported format become the same checked messages; bad rows name file and line."""

import json

import pytest

from dataset import DataError, read_jsonl, to_messages

EXPECTED = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]


@pytest.mark.parametrize("record", [
    {"conversations": EXPECTED},
    {"messages": EXPECTED},
    {"prompt": "What is 2+2?", "response": "4."},
    {"prompt": "What is 2+2?", "output": "4."},
    {"instruction": "What is 2+2?", "input": "", "output": "4."},
    {"text": "问：What is 2+2?\n答：4."},
])
def test_every_format_gives_the_same_messages(record):
    assert to_messages(record, "x.jsonl:1") == EXPECTED


def test_alpaca_input_and_multi_turn_text():
    got = to_messages({"instruction": "Translate.", "input": "你好", "output": "Hello."}, "x:1")
    assert got[0]["content"] == "Translate.\n\n你好"
    got = to_messages({"text": "问：一加一？\n答：二。\n问：二加二？\n答：四。"}, "x:1")
    assert [m["content"] for m in got] == ["一加一？", "二。", "二加二？", "四。"]


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"role": "robot", "content": "hi"}]},
     r"x.jsonl:3: conversations\[0\] has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"x.jsonl:3: messages\[1\] is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"prompt": "hi"}, "x.jsonl:3: no field 'output'"),
    ({"question": "hi"}, "unknown chat format"),
    ({"text": "just text"}, "问"),
])
def test_bad_records_name_file_line_and_field(record, message):
    with pytest.raises(DataError, match=message):
        to_messages(record, "x.jsonl:3")


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n\n{not json\n")
    rows = read_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        next(rows)
    with pytest.raises(FileNotFoundError, match="missing"):
        next(read_jsonl(tmp_path / "none.jsonl"))
