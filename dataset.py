"""Training data: random windows from the prepared token files, chat records, preference pairs and prompts.

Chats and preference pairs are tokenised once into a cache beside their file (tokencache.py) and read from it a
batch at a time, so a file of any size trains in the memory of a batch.
"""

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fileio import data_file
from tokencache import TokenRows, cache_dir, file_digest, is_complete, write_rows
from tokenizer import CHAT_ROLES


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

    def __len__(self) -> int:
        """Windows in one pass over the tokens (what --epochs counts)."""
        return len(self.tokens) // self.seq_len

    def sampler(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> WindowSampler:
        return WindowSampler(len(self.tokens), self.seq_len + 1, batch_size, seed, rank, world)

    def batch(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        """input_ids and labels (B, seq_len): labels are the inputs shifted by one token."""
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def eval_batches(self, batch_size: int, n_batches: int, rank: int = 0, world: int = 1):
        """n_batches random batches, the same at every call (seed 0); under DDP each rank takes its share."""
        sampler = self.sampler(batch_size, seed=0, rank=rank, world=world)
        for _ in range(n_batches):
            yield self.batch(sampler.next())


# ----------------------------------------------------------------------------- chat data
class DataError(ValueError):
    """A bad record; the message names the file and line (`data.jsonl:17: ...`)."""


def read_jsonl(path, on_error=None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-empty line; errors name "file:line".

    A bad line raises a DataError, or is passed to on_error(error) and skipped if on_error is given.
    """
    path = data_file(path)
    with open(path, "rb") as f:  # bytes, decoded line by line, so a bad encoding gets a line number too
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(raw.decode("utf-8-sig"))  # -sig: a byte-order mark (Windows editors) is skipped
            except UnicodeDecodeError:
                error = DataError(f"{where}: not UTF-8 text")
            except json.JSONDecodeError as e:
                error = DataError(f"{where}: not valid JSON ({e.msg})")
            else:
                if isinstance(record, dict):
                    yield line_no, record
                    continue
                error = DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if on_error is None:
                raise error
            on_error(error)


def text_field(record: dict, name: str, where: str) -> str:
    """record[name], which must be a string; errors name the file, line and field."""
    if name not in record:
        raise DataError(f"{where}: no field '{name}'")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is not a string")
    return value


def check_messages(messages, where: str, field_name: str = "conversations") -> list[dict]:
    """Validate a list of {"role", "content"} messages: known roles, string contents, a non-empty reply."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field_name}[{i}] needs a string 'content'")
        if m.get("role") not in CHAT_ROLES:
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
        prompt = text_field(record, "instruction", where)
        extra = record.get("input") or ""
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        reply = text_field(record, "output", where)
    elif "prompt" in record:
        prompt = text_field(record, "prompt", where)
        reply = text_field(record, "response" if "response" in record else "output", where)
    elif "text" in record:
        return check_messages(_qa_text_to_messages(text_field(record, "text", where), where), where, "text")
    else:
        raise DataError(f"{where}: unknown chat format: expected one of the fields conversations, messages, "
                        f"prompt, instruction, text; got {', '.join(record) or 'none'}")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    return check_messages(messages, where, "response")


def first_question(messages: list[dict]) -> tuple[list[dict], str]:
    """The prompt (system message if any, then the first user turn) and the expected first answer (the
    answer accuracy's question, and GRPO's and PPO's prompts)."""
    i = next(i for i, m in enumerate(messages) if m["role"] == "user")
    answer = next(m["content"] for m in messages[i + 1:] if m["role"] == "assistant")
    return messages[:i + 1], answer


# ----------------------------------------------------------------------------- reading and caching records
def where_prefix(source: str) -> str:
    """How messages name a record, less its number: "file:" (then the line), or "<dataset>:row " for hf:."""
    return f"{source[3:]}:row " if source.startswith("hf:") else f"{Path(source)}:"


def iter_records(source: str, on_error=None, hf_data_files: str = "",
                 hf_split: str = "train") -> Iterator[tuple[int, dict]]:
    """(line number, record) of a .jsonl file, or (row number, record) of an hf:<dataset>, both streamed."""
    if source.startswith("hf:"):
        from datasets import load_dataset  # imported here: slow to import and only needed for this source

        rows = load_dataset(source[3:], data_files=hf_data_files or None, split=hf_split, streaming=True)
        for i, row in enumerate(rows):
            yield i, dict(row)
    else:
        yield from read_jsonl(source, on_error)


class BadRows:
    """What to do with a malformed row: raise its DataError, or with skip (--skip_bad_rows) count it and go on."""

    def __init__(self, skip: bool):
        self.skip, self.count, self.first = skip, 0, None

    def __call__(self, error: DataError) -> None:
        if not self.skip:
            raise error
        self.count += 1
        self.first = self.first or str(error)


def load_chats(source: str, skip_bad_rows: bool = False, hf_data_files: str = "", hf_split: str = "train",
               limit: int | None = None) -> tuple[list[list[dict]], int]:
    """(the first `limit` chats as message lists, number of rows skipped) of a .jsonl file or an `hf:<dataset>`.

    A malformed row raises a DataError naming its file and line (its row number for hf:), or with
    skip_bad_rows is skipped and counted: never dropped silently.
    """
    reject, chats, where = BadRows(skip_bad_rows), [], where_prefix(source)
    for number, record in iter_records(source, reject, hf_data_files, hf_split):
        if len(chats) == limit:
            break
        try:
            chats.append(to_messages(record, f"{where}{number}"))
        except DataError as e:
            reject(e)
    return chats, reject.count


def tokenized(source: str, tokenizer, kind: str, encode, skip_bad_rows: bool = False, hf_data_files: str = "",
              hf_split: str = "train") -> TokenRows:
    """The token cache of `source`, built on first use; encode(tokenizer, record, where) gives a record's rows.

    Malformed rows are handled as load_chats does; a cache built while skipping them remembers the first, so
    that a later run without --skip_bad_rows stops at it as if it read the file.
    """
    directory = cache_dir(source, tokenizer, kind, hf_data_files, hf_split)
    if not is_complete(directory):
        reject, where = BadRows(skip_bad_rows), where_prefix(source)

        def rows():
            for number, record in tqdm(iter_records(source, reject, hf_data_files, hf_split),
                                       desc=f"tokenising {source} (once)", unit=" rows", mininterval=5):
                try:
                    encoded = encode(tokenizer, record, f"{where}{number}")
                except DataError as e:
                    reject(e)
                    continue
                for ids, mask in encoded:
                    yield number, ids, mask

        write_rows(directory, rows(), tokenizer.vocab_size,
                   lambda: {"kind": kind, "source": source, "skipped": reject.count, "first_error": reject.first})
    rows = TokenRows(directory)
    if rows.meta["skipped"] and not skip_bad_rows:
        raise DataError(rows.meta["first_error"])
    if not len(rows):
        raise DataError(f"{source}: no {kind}: " + (f"all {rows.meta['skipped']} rows are malformed, the first: "
                                                     f"{rows.meta['first_error']}" if rows.meta["skipped"] else
                                                     "it is empty"))
    return rows


class RowDataset:
    """Rows of a token cache (chats or preference pairs): `index` lists the rows kept, `batch(indices)` (the
    subclass's) stacks some of them, and RowSampler draws them."""

    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def identity(self) -> tuple[Path, str]:
        """(a path that files derived from these rows are named after, a text that changes whenever the rows, their
        tokens or their order change): the key of the teacher's stored outputs (teachercache.py)."""
        raise NotImplementedError

    def sampler(self, seed: int, rank: int = 0, world: int = 1) -> "RowSampler":
        return RowSampler(len(self), seed, rank, world)

    def eval_indices(self, batch_size: int, n_batches: int) -> list[list[int]]:
        """The first n_batches * batch_size rows, in batches of indices: the same at every call and on every rank."""
        n = min(len(self), n_batches * batch_size)
        return [list(range(start, min(n, start + batch_size))) for start in range(0, n, batch_size)]

    def eval_batches(self, batch_size: int, n_batches: int, rank: int = 0, world: int = 1):
        """The batches of eval_indices."""
        for indices in self.eval_indices(batch_size, n_batches):
            yield self.batch(indices)


class TextWindows(RowDataset):
    """The token file of a split cut into consecutive windows of seq_len inputs (and the next token of each as
    the last label), as rows: every window is visited once an epoch and always starts at the same token, so that
    what a model predicts in it can be stored (distillation with --teacher_topk). The loss counts every token."""

    def __init__(self, data_dir, split: str, seq_len: int):
        self.windows = PretrainDataset(data_dir, split, seq_len)
        self.seq_len, self.path = seq_len, Path(data_dir) / f"{split}.bin"
        self.index = np.arange((len(self.windows.tokens) - 1) // seq_len)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        batch = self.windows.batch(np.asarray(indices) * self.seq_len)
        return {**batch, "loss_mask": torch.ones(batch["labels"].shape)}

    def identity(self) -> tuple[Path, str]:
        return self.path.parent / ".cache" / self.path.name, f"{file_digest(self.path).hex()} seq_len {self.seq_len}"


# ----------------------------------------------------------------------------- supervised fine-tuning
def shift_chat(ids: list[int], mask: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, labels and loss_mask (each of length <= max_len) of one tokenised chat.

    ids and mask come from `Tokenizer.apply_chat_template(..., return_assistant_mask=True)`. labels[t] is the
    token after input_ids[t] (shifted here, once); loss_mask[t] is 1 where that token is assistant content or
    an assistant turn's closing <|im_end|>. A chat longer than max_len + 1 tokens is cut at the end, ids and
    mask together, so the mask stays aligned.
    """
    ids, mask = np.array(ids[:max_len + 1], dtype=np.int64), np.array(mask[:max_len + 1], dtype=np.int64)
    return ids[:-1], ids[1:], mask[1:]


def token_weights(labels: np.ndarray, mask: np.ndarray, weighted_ids=(), weight: float = 1.0) -> np.ndarray:
    """The loss weight of each label (float32): 0 where mask is 0, else 1, or `weight` for the ids in
    weighted_ids (e.g. the reasoning format's <think> and </think>, --think_weight)."""
    weights = mask.astype(np.float32)
    if len(weighted_ids) and weight != 1:
        weights[(mask != 0) & np.isin(labels, weighted_ids)] = weight
    return weights


def empty_chat_batch(rows: int, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and labels all padding, loss_mask (a float weight per label) all 0, each (rows, width)."""
    return {"input_ids": torch.full((rows, width), pad_id, dtype=torch.long),
            "labels": torch.full((rows, width), pad_id, dtype=torch.long),
            "loss_mask": torch.zeros((rows, width), dtype=torch.float32)}


def pad_right(rows, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, labels, loss_mask (len(rows), width) from shift_chat's triples, padded on the right.

    Padding comes after the real tokens, so causal attention never lets a real token see it; its loss_mask is 0.
    """
    batch = empty_chat_batch(len(rows), width, pad_id)
    for row, example in enumerate(rows):
        for name, values in zip(batch, example):
            batch[name][row, :len(values)] = torch.from_numpy(values)
    return batch


class RowSampler:
    """An endless stream of row indices, a fresh permutation of the rows every epoch.

    Item i of rank r is item i * world + r of the stream, which depends only on (seed, i), so the whole
    state is `position` (items drawn) and a resumed run draws exactly what the interrupted run would have.
    """

    def __init__(self, n_rows: int, seed: int, rank: int = 0, world: int = 1):
        if n_rows == 0:
            raise ValueError("no rows to sample from")
        self.n_rows, self.seed, self.rank, self.world = n_rows, seed, rank, world
        self.position = 0
        self._epoch, self._perm = -1, None

    def peek(self) -> int:
        """The next index, without drawing it."""
        epoch, i = divmod(self.position * self.world + self.rank, self.n_rows)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        return int(self._perm[i])

    def next(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            out.append(self.peek())
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def encode_chat(tokenizer, record: dict, where: str) -> list[tuple[list[int], list[int]]]:
    """A chat record's one cached row: its ChatML ids and assistant mask."""
    return [tokenizer.apply_chat_template(to_messages(record, where), return_assistant_mask=True)]


class SFTDataset(RowDataset):
    """Chats for supervised fine-tuning (a .jsonl file or hf:<dataset>, through its token cache), batched by
    padding or by packing. The loss mask weighs the reasoning format's <think> and </think> by think_weight."""

    def __init__(self, source: str, tokenizer, seq_len: int, drop_long: bool = False, skip_bad_rows: bool = False,
                 hf_data_files: str = "", hf_split: str = "train", think_weight: float = 1.0):
        self.seq_len, self.pad_id = seq_len, tokenizer.pad_id
        self.think_ids, self.think_weight = np.array(tokenizer.think_ids, dtype=np.int64), think_weight
        self.rows = tokenized(source, tokenizer, "chats", encode_chat, skip_bad_rows, hf_data_files, hf_split)
        lengths, first = self.rows.lengths(), np.asarray(self.rows.first_trained)
        too_long = lengths > seq_len + 1
        # A cut that leaves no assistant token would train on nothing: drop it, counted.
        keep = (first <= seq_len) & (first < lengths) & ~(too_long & drop_long)
        self.index = np.flatnonzero(keep)
        self.n_dropped, self.n_truncated = len(keep) - len(self.index), int((too_long & keep).sum())
        self.n_skipped = self.rows.meta["skipped"]
        self.n_tokens = int(np.minimum(lengths[keep] - 1, seq_len).sum())  # input tokens of one epoch
        if not len(self.index):
            raise ValueError(f"{source}: no chat has an assistant token within seq_len={seq_len}")

    def identity(self) -> tuple[Path, str]:
        rows = hashlib.blake2b(self.index.tobytes(), digest_size=16).hexdigest()
        return self.rows.directory, (f"{self.rows.directory.name} seq_len {self.seq_len} "
                                     f"think_weight {self.think_weight} rows {rows}")

    def summary(self) -> str:
        return (f"{len(self)} chats ({self.n_truncated} truncated to {self.seq_len} tokens, {self.n_dropped} dropped "
                f"as too long" + (f", {self.n_skipped} malformed rows skipped" if self.n_skipped else "") + ")")

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids, labels and loss_mask of chat i (shift_chat, cut to seq_len), the mask as token_weights."""
        input_ids, labels, mask = shift_chat(*self.rows.row(int(self.index[i])), self.seq_len)
        return input_ids, labels, token_weights(labels, mask, self.think_ids, self.think_weight)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """One chat per row, right-padded: input_ids, labels, loss_mask (B, T).

        T is the longest chat rounded up to a multiple of 16 (few distinct shapes for torch.compile).
        """
        examples = [self.example(i) for i in indices]
        longest = max(len(e[0]) for e in examples)
        return pad_right(examples, min(self.seq_len, 16 * -(-longest // 16)), self.pad_id)

    def packed_batch(self, sampler: RowSampler, batch_size: int) -> dict[str, torch.Tensor]:
        """batch_size rows of seq_len tokens, each filled with whole chats in sampler order.

        segment_ids (B, T) number the chats of a row (0 = padding) so attention stays inside each chat.
        RoPE is relative, so a chat's logits do not depend on where in the row it sits. A chat that does
        not fit in the last row is left for the next batch (the sampler does not advance past it).
        """
        T = self.seq_len
        batch = {**empty_chat_batch(batch_size, T, self.pad_id),
                 "segment_ids": torch.zeros((batch_size, T), dtype=torch.long)}
        row, used, segment = 0, 0, 0
        while True:
            example = self.example(sampler.peek())
            n = len(example[0])
            if used + n > T:
                row, used = row + 1, 0
                if row == batch_size:
                    return batch
            sampler.position += 1
            segment += 1
            for name, values in zip(batch, example):
                batch[name][row, used:used + n] = torch.from_numpy(values)
            batch["segment_ids"][row, used:used + n] = segment
            used += n


def format_mask(tokenizer, input_ids, labels, loss_mask) -> str:
    """A chat as text with the trained-on tokens (the labels where loss_mask is not 0) between ⟦ and ⟧, and
    ×W after the tokens of weight W != 1."""
    ids = [int(input_ids[0]), *(int(t) for t in labels)]
    weights = [0.0, *(float(m) for m in loss_mask)]
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or weights[i] != weights[start]:  # the end of a run of equally weighted tokens
            text, weight = tokenizer.decode(ids[start:i]), weights[start]
            out.append(text if weight == 0 else f"⟦{text}⟧" + (f"×{weight:g}" if weight != 1 else ""))
            start = i
    return "".join(out)


# ----------------------------------------------------------------------------- preference pairs
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _hh_to_messages(text: str, where: str, field_name: str) -> list[dict]:
    """Anthropic HH text ("\\n\\nHuman: …\\n\\nAssistant: …") to messages; an empty final "Assistant:" is dropped."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: field '{field_name}' is not in the \\n\\nHuman: …\\n\\nAssistant: … form")
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # a prompt ending in "Assistant:" asks for the reply
    return messages


def _is_hh(text: str) -> bool:
    return text.lstrip("\n").startswith(("Human:", "Assistant:"))


def _split_shared_prefix(chosen: list[dict], rejected: list[dict], where: str):
    """(prompt, chosen reply, rejected reply): the prompt is the messages both conversations share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) or n == len(rejected):
        raise DataError(f"{where}: 'chosen' and 'rejected' do not differ after their shared prompt")
    if n == 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt")
    if chosen[n]["role"] != "assistant" or rejected[n]["role"] != "assistant":
        raise DataError(f"{where}: 'chosen' and 'rejected' must differ first in an assistant turn")
    return chosen[:n], chosen[n:], rejected[n:]


def to_preference(record: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """A preference record in any supported format, as (prompt messages, chosen reply, rejected reply). By fields:

    {"prompt", "chosen", "rejected"} strings (the prompt may be HH text, as in Dahoas/rm-static, whose
    "response" repeats "chosen"); {"chosen": [messages], "rejected": [messages]} (minimind dpo.jsonl);
    {"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": …} (Anthropic HH-RLHF). Without a prompt field,
    the prompt is the messages that chosen and rejected share.
    """
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: unknown preference format: expected the fields chosen and rejected (and "
                        f"optionally prompt); got {', '.join(record) or 'none'}")
    if "prompt" in record:
        prompt_text = text_field(record, "prompt", where)
        if _is_hh(prompt_text):
            prompt = _hh_to_messages(prompt_text, where, "prompt")
        else:
            prompt = [{"role": "user", "content": prompt_text}]
        replies = [[{"role": "assistant", "content": text_field(record, name, where).strip()}]
                   for name in ("chosen", "rejected")]
        chosen, rejected = (check_messages(prompt + reply, where, name)
                            for reply, name in zip(replies, ("chosen", "rejected")))
    elif isinstance(record["chosen"], list):
        chosen, rejected = (check_messages(record[name], where, name) for name in ("chosen", "rejected"))
    else:
        chosen, rejected = (check_messages(_hh_to_messages(text_field(record, name, where), where, name), where, name)
                            for name in ("chosen", "rejected"))
    return _split_shared_prefix(chosen, rejected, where)  # which also refuses a pair whose replies are the same


def tokenize_pair(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict]):
    """(prompt ids, (chosen ids, mask), (rejected ids, mask)): each reply's tokens after the shared prompt.

    The template encodes each message on its own, so the prompt's tokens are a prefix of both conversations.
    """
    prompt_ids = tokenizer.apply_chat_template(prompt)
    replies = []
    for reply in (chosen, rejected):
        ids, mask = tokenizer.apply_chat_template(prompt + reply, return_assistant_mask=True)
        if ids[:len(prompt_ids)] != prompt_ids:  # a model's own template (hf.py) might not
            raise ValueError("the chat template writes the prompt differently once a reply follows, so the reply "
                             "cannot be cut off it")
        replies.append((ids[len(prompt_ids):], mask[len(prompt_ids):]))
    return prompt_ids, replies[0], replies[1]


def truncate_pair(prompt_ids, chosen, rejected, max_tokens: int):
    """The chosen and rejected sequences (prompt, then reply) with their response masks, at most max_tokens each.

    Too long a pair loses prompt tokens first, from the left (the question at the end of a prompt is kept), so
    that the replies keep their ends; only a reply longer than max_tokens on its own is cut at the end.
    Returns ((chosen_ids, chosen_mask), (rejected_ids, rejected_mask), truncated) as int64 arrays.
    """
    longest = max(len(chosen[0]), len(rejected[0]))
    keep = max(0, min(len(prompt_ids), max_tokens - longest))
    kept = np.asarray(prompt_ids[len(prompt_ids) - keep:], dtype=np.int64)
    out = tuple((np.concatenate([kept, np.asarray(ids, dtype=np.int64)])[:max_tokens],
                 np.concatenate([np.zeros(keep, np.int64), np.asarray(mask, dtype=np.int64)])[:max_tokens])
                for ids, mask in (chosen, rejected))
    return out[0], out[1], keep < len(prompt_ids) or longest + keep > max_tokens


def encode_preference(tokenizer, record: dict, where: str) -> list[tuple[list[int], list[int]]]:
    """A preference record's three cached rows: the prompt (mask all 0), the chosen and the rejected reply."""
    prompt_ids, chosen, rejected = tokenize_pair(tokenizer, *to_preference(record, where))
    return [(prompt_ids, [0] * len(prompt_ids)), chosen, rejected]


class PreferenceDataset(RowDataset):
    """Preference pairs (a .jsonl file or hf:<dataset>, through its token cache). A batch stacks all chosen rows,
    then all rejected rows.

    Malformed rows raise a DataError naming file and line, or with skip_bad_rows are skipped and counted
    (`n_skipped`), as is a pair none of whose reply fits in max_tokens. `reference_logps` (N, 2), once set, is
    served with the batches (--precompute_ref).
    """

    def __init__(self, source: str, tokenizer, max_tokens: int, skip_bad_rows: bool = False,
                 hf_data_files: str = "", hf_split: str = "train"):
        self.pad_id, self.max_tokens = tokenizer.pad_id, max_tokens + 1  # +1: inputs and labels overlap
        self.rows = tokenized(source, tokenizer, "preferences", encode_preference, skip_bad_rows, hf_data_files,
                              hf_split)
        lengths = self.rows.lengths().reshape(-1, 3)  # prompt, chosen, rejected
        first = np.asarray(self.rows.first_trained).reshape(-1, 3)[:, 1:]
        longest = lengths[:, 1:].max(1)
        keep = np.clip(self.max_tokens - longest, 0, lengths[:, 0])  # prompt tokens kept (truncate_pair)
        fits = (keep[:, None] + first < self.max_tokens).all(1)  # each reply has a token among the labels
        if not skip_bad_rows and not fits.all():
            where = f"{where_prefix(source)}{self.rows.lines[3 * np.flatnonzero(~fits)[0]]}"
            raise DataError(f"{where}: no reply token fits in {max_tokens} tokens; raise --seq_len")
        self.index = np.flatnonzero(fits)
        self.n_skipped = self.rows.meta["skipped"] + int((~fits).sum())
        self.n_truncated = int(((keep < lengths[:, 0]) | (longest + keep > self.max_tokens))[fits].sum())
        if not len(self.index):
            raise ValueError(f"{source}: no preference pairs")
        self.reference_logps: torch.Tensor | None = None

    def pair(self, i: int):
        """((chosen ids, mask), (rejected ids, mask)) of pair i, as truncate_pair cuts them."""
        k = 3 * int(self.index[i])
        prompt, chosen, rejected = (self.rows.row(k + j) for j in range(3))
        return truncate_pair(prompt[0], chosen, rejected, self.max_tokens)[:2]

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """input_ids, labels, loss_mask (2B, T): rows [0, B) chosen, [B, 2B) rejected, right-padded.

        Right padding needs no attention mask in a causal model: no real token attends to a later one.
        """
        pairs = [self.pair(i) for i in indices]
        rows = [shift_chat(ids, mask, len(ids)) for ids, mask in [p[0] for p in pairs] + [p[1] for p in pairs]]
        batch = pad_right(rows, max(len(ids) for ids, _, _ in rows), self.pad_id)
        if self.reference_logps is not None:
            batch["reference_logps"] = self.reference_logps[torch.as_tensor(indices)].T.reshape(-1)
        return batch


# ----------------------------------------------------------------------------- prompts for reinforcement learning
def encode_prompt(tokenizer, record: dict, where: str) -> list[tuple[list[int], list[int]]]:
    """A chat record's two cached rows: its first question as a generation prompt (the messages up to the first
    user turn, then the assistant header) and the expected first reply (mask all 1)."""
    messages = to_messages(record, where)
    try:
        prompt, answer = first_question(messages)
    except StopIteration:
        raise DataError(f"{where}: no assistant reply after the first user turn") from None
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    answer_ids = tokenizer.encode(answer)
    return [(prompt_ids, [0] * len(prompt_ids)), (answer_ids, [1] * len(answer_ids))]


class PromptDataset(RowDataset):
    """Prompts with their expected answers, for GRPO and PPO: the first question and reply of each chat (a .jsonl
    file or hf:<dataset>, any chat format, through its token cache).

    A prompt longer than max_prompt_tokens would leave no room in the context for its completion: it is left out
    and counted (n_too_long), as malformed rows are with skip_bad_rows (n_skipped).
    """

    def __init__(self, source: str, tokenizer, max_prompt_tokens: int, skip_bad_rows: bool = False,
                 hf_data_files: str = "", hf_split: str = "train"):
        self.tokenizer = tokenizer
        self.rows = tokenized(source, tokenizer, "prompts", encode_prompt, skip_bad_rows, hf_data_files, hf_split)
        fits = self.rows.lengths()[0::2] <= max_prompt_tokens
        self.index = np.flatnonzero(fits)
        self.n_too_long, self.n_skipped = int((~fits).sum()), self.rows.meta["skipped"]
        if not len(self.index):
            raise ValueError(f"{source}: no prompt fits in {max_prompt_tokens} tokens (the context less the "
                             f"completion); lower --max_completion_length or raise --seq_len")

    def prompt(self, i: int) -> tuple[list[int], str]:
        """Prompt i's token ids (ending with the assistant header) and its expected answer."""
        k = 2 * int(self.index[i])
        return self.rows.row(k)[0].tolist(), self.tokenizer.decode(self.rows.row(k + 1)[0])
