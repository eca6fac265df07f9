"""Byte-level BPE tokenizer on tiktoken, with ChatML special tokens.

Two sources of vocabularies:
  * `Tokenizer.train`: our own BPE, trained with HF `tokenizers` (fast, Rust) and then
    run by tiktoken (faster encoding, tiny `.tiktoken` storage). Works offline.
  * `Tokenizer.from_tiktoken`: OpenAI's encodings (gpt2, cl100k_base, o200k_base), which
    tiktoken downloads once into its cache.
Either way the special tokens below exist (tokenizers made before the reasoning format lack its two,
<think> and </think>), and `save_pretrained`/`from_pretrained` store the tokenizer as
`tokenizer.tiktoken` + `tokenizer_config.json`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable

import tiktoken
from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from fileio import atomic_write, write_json

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
CHAT_TOKENS = [EOT, IM_START, IM_END, PAD]  # every tokenizer has these
# The reasoning format: an assistant reply `<think>` + reasoning + `</think>` + the answer (R1 style).
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = [*CHAT_TOKENS, THINK_START, THINK_END]  # what a new tokenizer gets
CHAT_ROLES = ("system", "user", "assistant")

# GPT-4's cl100k split pattern, except `\p{N}{1,3}` instead of `\p{N}{1,3}+`: Oniguruma
# (used by `tokenizers`) reads `{1,3}+` as "repeat {1,3} one or more times", not as
# possessive, so numbers would split differently. With this spelling both regex engines
# split text identically (fuzz-tested), which is what keeps the ids equal.
PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
VOCAB_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer_config.json"


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode, the byte -> printable char map of ByteLevel."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def train_hf_bpe(texts: Iterable[str], vocab_size: int = 6400) -> HFTokenizer:
    """Train the HF byte-level BPE behind `Tokenizer.train` (without the special tokens).

    It gets `vocab_size - len(SPECIAL_TOKENS)` tokens: the 256 bytes (ids 0..255, in
    GPT-2's byte order), then one token per merge, in merge order. A corpus too small to
    supply that many merges yields fewer tokens.
    """
    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, "
                         f"got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    # Regex split first, then map bytes to chars without ByteLevel's own (GPT-2) regex.
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, always
    )
    hf.train_from_iterator(texts, trainer)
    return hf


class Tokenizer:
    """tiktoken encoding plus our special tokens, whose ids follow every BPE token."""

    def __init__(self, name: str, pat_str: str, mergeable_ranks: dict[bytes, int],
                 special_tokens: dict[str, int]):
        missing = [t for t in CHAT_TOKENS if t not in special_tokens]
        if missing:
            raise ValueError(f"special tokens missing: {missing}")
        ids = [*mergeable_ranks.values(), *special_tokens.values()]
        if len(set(ids)) != len(ids):  # tiktoken would panic, not raise
            raise ValueError("token ids must be unique")
        self.name = name
        self.pat_str = pat_str
        self.mergeable_ranks = mergeable_ranks
        self.special_ids = dict(special_tokens)
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_ids)

    # ---- construction ----

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 6400) -> Tokenizer:
        """Train a BPE whose total vocabulary, specials included, is `vocab_size`.

        A too small corpus gives fewer tokens; `vocab_size` then reports the true total.
        """
        return cls.from_hf_bpe(train_hf_bpe(texts, vocab_size))

    @classmethod
    def from_hf_bpe(cls, hf: HFTokenizer) -> Tokenizer:
        """Port a BPE made by `train_hf_bpe` to tiktoken, keeping its ids."""
        model = json.loads(hf.to_str())["model"]
        vocab = model["vocab"]
        # merges are "a b" strings before tokenizers 0.20 and [a, b] pairs from then on
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        # tiktoken merges by the rank of the merged token, HF by the merge's position:
        # the two agree only if merge i created token 256 + i.
        if len(merges) != len(vocab) - 256 or any(
                vocab.get(a + b) != 256 + i for i, (a, b) in enumerate(merges)):
            raise ValueError("HF merges are not in token id order; tiktoken would differ")
        to_byte = _unicode_to_byte()
        ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
        n = len(ranks)
        specials = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}
        return cls(f"bpe{n + len(specials)}", PAT_STR, ranks, specials)

    @classmethod
    def from_tiktoken(cls, name: str) -> Tokenizer:
        """One of tiktoken's encodings, e.g. gpt2, cl100k_base, o200k_base.

        Only our special tokens are kept: the encoding's own `<|endoftext|>` id where it
        has one, and new ids after its largest id for the rest.
        """
        if name not in tiktoken.list_encoding_names():
            raise ValueError(f"unknown tiktoken encoding {name!r}; "
                             f"known: {', '.join(tiktoken.list_encoding_names())}")
        try:
            base = tiktoken.get_encoding(name)
        except Exception as e:
            raise RuntimeError(
                f"tiktoken encoding {name!r} needs a network connection or "
                f"TIKTOKEN_CACHE_DIR with its cached file ({type(e).__name__}); the offline "
                f"default is the trained BPE: python prepare.py --tokenizer bpe") from e
        # _pat_str etc. are the extension route tiktoken's README documents
        specials = {EOT: base._special_tokens[EOT]} if EOT in base._special_tokens else {}
        for token in SPECIAL_TOKENS:
            specials.setdefault(token, max([base.max_token_value, *specials.values()]) + 1)
        return cls(name, base._pat_str, base._mergeable_ranks, specials)

    # ---- storage ----

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.tiktoken` (`base64(bytes) rank` lines) and the JSON config."""
        os.makedirs(directory, exist_ok=True)
        lines = b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in
                         sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))
        config = {"name": self.name, "pat_str": self.pat_str,
                  "special_tokens": self.special_ids}
        atomic_write(os.path.join(directory, VOCAB_FILE), lines)
        write_json(os.path.join(directory, CONFIG_FILE), config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load what `save_pretrained` wrote; local files only."""
        vocab_path = os.path.join(directory, VOCAB_FILE)
        config_path = os.path.join(directory, CONFIG_FILE)
        for path in (vocab_path, config_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        # Parsed here rather than by tiktoken.load.load_tiktoken_bpe, which also copies
        # the file into tiktoken's cache keyed by its path and then prefers that stale copy.
        try:
            with open(vocab_path, "rb") as f:
                ranks = {base64.b64decode(token, validate=True): int(rank)
                         for token, rank in (line.split() for line in f if line.strip())}
        except ValueError as e:
            raise ValueError(f"broken tokenizer file {vocab_path}: {e}") from None
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            args = config["name"], config["pat_str"], ranks, config["special_tokens"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"broken tokenizer file {config_path}: {e!r}") from None
        try:
            return cls(*args)
        except (ValueError, TypeError) as e:
            raise ValueError(f"broken tokenizer files in {directory}: {e}") from None

    # ---- encoding ----

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings stay plain text unless allow_special,
        so untrusted text cannot inject control tokens."""
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_reply(self, text: str) -> list[int]:
        """Token ids of an assistant's reply: as `encode`, except that the reasoning format's
        <think> and </think> are its special tokens."""
        reasoning = {THINK_START, THINK_END} & self.special_ids.keys()
        return self.enc.encode(text, allowed_special=reasoning, disallowed_special=())

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` (no specials) of many texts, on tiktoken's thread pool."""
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.enc.decode([int(i) for i in ids], errors="replace")

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
        return_assistant_mask: bool = False,
    ) -> list[int] | tuple[list[int], list[int]]:
        """ChatML ids: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

        Pieces are encoded separately (never across a boundary), so a conversation and
        its prefixes tokenise the same at training and inference time. The mask, if asked
        for, is 1 on each assistant content and its `<|im_end|>`: what the model must learn
        to write, including when to stop. In an assistant's content `<think>` and `</think>`
        are the special tokens (if the tokenizer has them); every other text is plain text.
        """
        ids: list[int] = []
        mask: list[int] = []
        for message in messages:
            role = message["role"]
            if role not in CHAT_ROLES:
                raise ValueError(f"unknown chat role {role!r}; expected one of {CHAT_ROLES}")
            head = [self.im_start_id, *self.encode(role + "\n")]
            content = message["content"]
            body = [*(self.encode_reply(content) if role == "assistant" else self.encode(content)), self.im_end_id]
            tail = self.encode("\n")
            ids += head + body + tail
            mask += [0] * len(head) + [int(role == "assistant")] * len(body) + [0] * len(tail)
        if add_generation_prompt:
            head = [self.im_start_id, *self.encode("assistant\n")]
            ids += head
            mask += [0] * len(head)
        return (ids, mask) if return_assistant_mask else ids

    # ---- properties ----

    @property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1), specials included: the embedding table size."""
        return self.enc.max_token_value + 1

    @property
    def eot_id(self) -> int:
        return self.special_ids[EOT]

    @property
    def im_start_id(self) -> int:
        return self.special_ids[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.special_ids[IM_END]

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    @property
    def think_ids(self) -> tuple[int, ...]:
        """The ids of <think> and </think>; () for a tokenizer made before the reasoning format."""
        return tuple(self.special_ids[t] for t in (THINK_START, THINK_END) if t in self.special_ids)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def split_think(reply: str) -> tuple[str, str]:
    """(reasoning, answer) of a reply in the reasoning format `<think>…</think>answer`; ("", reply) for a plain
    reply. A reply that opens <think> and never closes it has no answer yet: (the rest, "")."""
    if THINK_END in reply:
        think, answer = reply.rsplit(THINK_END, 1)
        return think.replace(THINK_START, "", 1).strip(), answer.strip()
    if reply.lstrip().startswith(THINK_START):
        return reply.lstrip()[len(THINK_START):].strip(), ""
    return "", reply
