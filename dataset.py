"""Training data: random windows from the prepared token files, drawn by a resumable sampler."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


class WindowSampler:
    """Deterministic random window starts: global batch number n depends only on (seed, n).

    Under DDP each of `world` ranks takes its contiguous block of batch_size rows of the global batch
    (batch_size * world rows), so N ranks with batch_size B see exactly the windows of one process with
    batch_size N * B. Its whole state is `position`, the number of batches drawn, so a resumed run draws
    exactly the batches the interrupted run would have drawn next.
    """

    def __init__(self, n_tokens: int, window: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n_tokens <= window:
            raise ValueError(f"{n_tokens} tokens are too few for windows of {window} tokens")
        self.n_starts = n_tokens - window
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.position = 0

    def next(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        starts = rng.integers(0, self.n_starts, size=self.batch_size * self.world)
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class PretrainDataset:
    """Windows of seq_len + 1 tokens from `<data_dir>/<split>.bin` (memory-mapped, as in nanoGPT)."""

    def __init__(self, data_dir, split: str, seq_len: int):
        data_dir = Path(data_dir)
        meta_path = data_dir / "meta.json"
        path = data_dir / f"{split}.bin"
        for p in (meta_path, path):
            if not p.exists():
                raise FileNotFoundError(f"{p}: missing; run `python prepare.py` first")
        meta = json.loads(meta_path.read_text())
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens, too few for sequences of {seq_len}")
        self.seq_len = seq_len
        self.meta = meta

    def sampler(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> WindowSampler:
        return WindowSampler(len(self.tokens), self.seq_len + 1, batch_size, seed, rank, world)

    def batch(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        """input_ids and labels (B, seq_len): labels are the inputs shifted by one token."""
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


# ----------------------------------------------------------------------------- chat data
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad record; the message names the file and line (`data.jsonl:17: ...`)."""


def read_jsonl(path) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for each non-empty line, where = "file:line" for error messages."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _text_field(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is {'missing' if value is None else 'not a string'}")
    return value


def check_messages(messages, where: str, field_name: str = "conversations") -> list[dict]:
    """Validate a list of {"role", "content"} messages: known roles, string contents, a non-empty reply."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field_name}[{i}] needs a string 'content'")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: {field_name}[{i}] has unknown role {m.get('role')!r}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: {field_name}[{i}] is an empty assistant turn")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field '{field_name}' has no assistant turn")
    return out


def _qa_text_to_messages(text: str, where: str) -> list[dict]:
    """Plain text in the `问：…\\n答：…` form (several pairs allowed) to messages."""
    messages = []
    for part in text.split("问：")[1:]:
        if "答：" not in part:
            raise DataError(f"{where}: field 'text': a 问： without its 答：")
        question, answer = part.split("答：", 1)
        messages += [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer.strip()}]
    if not messages:
        raise DataError(f"{where}: field 'text' is not in the 问：…答：… form")
    return messages


def to_messages(record: dict, where: str) -> list[dict]:
    """A chat record in any supported format, as a checked list of messages. Formats, by their fields:

    {"conversations": [...]} (minimind), {"messages": [...]} (OpenAI/HF), {"prompt", "response"},
    {"prompt", "output"}, Alpaca {"instruction", "input", "output"}, {"text": "问：…\\n答：…"}.
    """
    for key in ("conversations", "messages"):
        if key in record:
            return check_messages(record[key], where, key)
    if "instruction" in record:
        prompt = _text_field(record, "instruction", where)
        extra = record.get("input") or ""
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        reply = _text_field(record, "output", where)
    elif "prompt" in record:
        prompt = _text_field(record, "prompt", where)
        reply = _text_field(record, "response" if "response" in record else "output", where)
    elif "text" in record:
        return check_messages(_qa_text_to_messages(_text_field(record, "text", where), where), where, "text")
    else:
        raise DataError(f"{where}: unknown chat format: expected one of the fields conversations, messages, "
                        f"prompt, instruction, text; got {', '.join(record) or 'none'}")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    return check_messages(messages, where, "response")
