"""Byte-level BPE tokenizer on tiktoken, with ChatML special tokens.

Three sources of vocabularies:
  * `Tokenizer.train`: our own BPE, trained with HF `tokenizers` (fast, Rust) and then
    run by tiktoken (faster encoding, tiny `.tiktoken` storage). Works offline.
  * `Tokenizer.from_tiktoken`: OpenAI's encodings (gpt2, cl100k_base, o200k_base), which
    tiktoken downloads once into its cache.
  * `HFTokenizer`: a pretrained model's byte-level BPE (a Hugging Face tokenizer.json), with the
    same ids as transformers, and the model's own chat template (rendered with jinja2).
Our own have the special tokens below (those made before the reasoning format lack its two, <think> and
</think>), and `save_pretrained`/`from_pretrained` store them as `tokenizer.tiktoken` + `tokenizer_config.json`;
an HFTokenizer is stored as the Hugging Face files. `save_hf` writes either in the Hugging Face format (export.py).
"""

from __future__ import annotations

import base64
import bisect
import codecs
import hashlib
import itertools
import json
import os
import re
import unicodedata
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import regex
import tiktoken
import tokenizers
from tokenizers import Regex, models, pre_tokenizers, trainers

from fileio import atomic_write, write_json
from hf import resolve

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
CHAT_TOKENS = [EOT, IM_START, IM_END, PAD]  # every tokenizer has these
# The reasoning format: an assistant reply `<think>` + reasoning + `</think>` + the answer (R1 style).
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = [*CHAT_TOKENS, THINK_START, THINK_END]  # what a new tokenizer gets
CHAT_ROLES = ("system", "user", "assistant")

# GPT-4's cl100k split pattern with three changes, which make a name the same token(s) wherever it stands, so
# that a small model can copy it from a story into an answer:
#   * every Han (Chinese) character is a piece of its own (`\p{Han}`; the letter runs are `[^\p{Han}\P{L}]`,
#     letters that are not Han). Chinese has no spaces, so cl100k's letter runs would be whole clauses, and the
#     BPE would learn templated clauses as single tokens, a name fused with its neighbours.
#   * a word that starts with a capital letter does not take the space before it (`(?!\p{Lu})`): " Tom" in
#     "gave it to Tom" and "Tom" at the start of a sentence or a reply are both " " + "Tom", not two unrelated
#     tokens. It costs one token per capitalised word inside a sentence.
#   * `\p{N}{1,3}` instead of `\p{N}{1,3}+`: Oniguruma (used by `tokenizers`) reads `{1,3}+` as "repeat
#     {1,3} one or more times", not as possessive, so numbers would split differently.
# Both regex engines split text identically with this pattern (fuzz-tested), which is what keeps the ids equal.
PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|\p{Han}|(?:[^\r\n\p{L}\p{N}](?!\p{Lu}))?+[^\p{Han}\P{L}]++|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
VOCAB_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"
# GPT-2's split, the one tokenizers' ByteLevel pre-tokenizer applies with use_regex.
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Our apply_chat_template as a jinja template (a Hugging Face tokenizer_config.json's chat_template).
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode, the byte -> printable char map of ByteLevel."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def _byte_level(token: bytes) -> str:
    """bytes -> ByteLevel's printable string (how tokenizer.json spells a token)."""
    return "".join(_BYTE_TO_CHAR[b] for b in token)


_BYTE_TO_CHAR = {b: c for c, b in _unicode_to_byte().items()}


def train_hf_bpe(texts: Iterable[str], vocab_size: int = 6400) -> tokenizers.Tokenizer:
    """Train the HF byte-level BPE behind `Tokenizer.train` (without the special tokens).

    It gets `vocab_size - len(SPECIAL_TOKENS)` tokens: the 256 bytes (ids 0..255, in
    GPT-2's byte order), then one token per merge, in merge order. A corpus too small to
    supply that many merges yields fewer tokens.
    """
    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, "
                         f"got {vocab_size}")
    hf = tokenizers.Tokenizer(models.BPE())
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
    def from_hf_bpe(cls, hf: tokenizers.Tokenizer) -> Tokenizer:
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
            raise ConnectionError(
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
        """Load what `save_pretrained` wrote, or a Hugging Face tokenizer.json (an HFTokenizer); hf:ORG/NAME is
        downloaded first (hf.resolve)."""
        directory = resolve(directory)
        vocab_path = os.path.join(directory, VOCAB_FILE)
        config_path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(vocab_path) and os.path.isfile(os.path.join(directory, HF_FILE)):
            return HFTokenizer.from_directory(directory)
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

    def save_hf(self, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
        """Write the Hugging Face files (tokenizer.json, tokenizer_config.json with ChatML as its chat_template),
        which transformers' AutoTokenizer loads with the same ids.

        tokenizer.json holds the BPE as tokenizers wants it: the vocabulary in rank order and the merges that
        made each token (recovered from the ranks), ignore_merges as tiktoken does (a piece found whole in the
        vocabulary is one token), and our split regex before a ByteLevel step without its own regex.
        """
        ranked = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        merges = [[_byte_level(part) for part in _merge_of(self.mergeable_ranks, token, rank)]
                  for token, rank in ranked if len(token) > 1]
        # Oniguruma (tokenizers) reads `{m,n}+` as a repetition, not as possessive; without the + both agree.
        pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", self.pat_str)
        data = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for t, i in self.special_ids.items()],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {_byte_level(token): rank for token, rank in ranked}, "merges": merges}}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML_TEMPLATE, "bos_token": None,
                  "eos_token": EOT, "pad_token": PAD, "unk_token": None, "clean_up_tokenization_spaces": False,
                  "model_max_length": model_max_length}
        os.makedirs(directory, exist_ok=True)
        write_json(os.path.join(directory, HF_FILE), data)
        write_json(os.path.join(directory, CONFIG_FILE), config)

    def fingerprint(self) -> bytes:
        """A digest of what decides the ids: the split pattern, merge ranks and special tokens. Two tokenizers
        with the same fingerprint turn every text into the same ids."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.pat_str.encode())
        h.update(json.dumps(self.special_ids, sort_keys=True).encode())
        for token, rank in self.mergeable_ranks.items():
            h.update(len(token).to_bytes(2, "little") + token + rank.to_bytes(4, "little"))
        return h.digest()

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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a piece of a UTF-8 character, possibly)."""
        return self.enc.decode_single_token_bytes(token_id)

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

    chat_template: str | None = None  # None: the ChatML of apply_chat_template below
    bos_id: int | None = None  # our tokenizers put no token before a text

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


def _merge_of(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The two tokens BPE joins into `token`: byte-pair merging of its bytes with the lower ranks only."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


# ----------------------------------------------------------------------------- pretrained (Hugging Face) tokenizers
class HFTokenizer(Tokenizer):
    """A pretrained model's byte-level BPE from its tokenizer.json, run by tiktoken with transformers' ids.

    What `tokenizers` does to a text, step by step, and where it happens here:
      1. added tokens (special or not) are cut out first, the longest where several match (`encode`);
      2. the normalizer (Qwen: NFC) applies to the text between them (unicodedata);
      3. the pre-tokenizer chain splits it: every split before the last one in Python (SmolLM2's Digits step
         isolates each digit before the ByteLevel regex, which no single regex reproduces), the last one by
         tiktoken's regex;
      4. byte-level BPE merges each piece, the earliest merge first. tiktoken merges the lowest-ranked
         token instead, which is the same when a token's rank is the position of the merge that made it: so
         ranks follow the merges, and `rank_to_id` maps them to the vocabulary's ids where those are not in
         merge order (where they are, e.g. GPT-2, Qwen, SmolLM2, the ids serve as ranks directly).
    The chat template is the model's (tokenizer_config.json or chat_template.jinja), rendered with jinja2 as
    transformers renders it, and the whole text is encoded as transformers encodes it.
    """

    def __init__(self, data: dict, config: dict, chat_template: str | None, name: str):
        self.data, self.config, self.chat_template, self.name = data, config, chat_template, name
        model = data.get("model") or {}
        steps = _pre_tokenizer_steps(data.get("pre_tokenizer"))
        if model.get("type") != "BPE":
            raise ValueError(f"{name}: a {model.get('type')} tokenizer (SentencePiece Unigram, WordPiece, ...) is not "
                             f"supported: only byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM, Mistral Nemo)")
        if not steps or steps[-1]["type"] != "ByteLevel" or model.get("byte_fallback"):
            raise ValueError(f"{name}: a BPE without a byte-level pre-tokenizer (SentencePiece-style, as Llama 2, "
                             f"Mistral 7B and TinyLlama have) is not supported: only byte-level BPE")
        self.added = {t["content"]: t for t in data.get("added_tokens") or []}
        self.special_ids = {c: t["id"] for c, t in self.added.items() if t.get("special")}
        self.id_bytes = {t["id"]: c.encode() for c, t in self.added.items()}
        self.normal_forms = _normal_forms(data.get("normalizer"), name)
        splits = _split_patterns(steps, name)
        self.pre_splits = [regex.compile(p) for p in splits[:-1]]
        # tiktoken keeps only what its regex matches; HF keeps the text between matches as pieces too: the
        # second alternative matches such a stretch (characters where the pattern does not match).
        self.pat_str = f"(?:{splits[-1]})|(?:(?!(?:{splits[-1]}))[\\s\\S])+"
        self.mergeable_ranks, self.rank_to_id = self._ranks(model)
        self._vocab_size = max(self.id_bytes) + 1
        self.enc = tiktoken.Encoding(name, pat_str=self.pat_str, mergeable_ranks=self.mergeable_ranks,
                                     special_tokens={})
        self.added_patterns = {allow: _added_pattern([t for t in self.added.values() if allow or not t.get("special")])
                               for allow in (False, True)}
        self.special_tokens_map = {key: value for key in ("bos_token", "eos_token", "unk_token", "sep_token",
                                                          "pad_token", "cls_token", "mask_token")
                                   if (value := _token_content(config.get(key)))}
        eos = self.special_tokens_map.get("eos_token", EOT)
        if self.id_of(eos) is None:
            raise ValueError(f"{name}: no end-of-sequence token (eos_token in tokenizer_config.json)")
        self._eot_id = self.id_of(eos)
        self.bos_id = self.id_of(self.special_tokens_map.get("bos_token"))
        pad = self.id_of(self.special_tokens_map.get("pad_token"))
        self._pad_id = self._eot_id if pad is None else pad
        self._turn_end_id = self._find_turn_end()

    @classmethod
    def from_directory(cls, directory) -> HFTokenizer:
        """tokenizer.json, tokenizer_config.json (or the older special_tokens_map.json) and the chat template."""
        d = Path(directory)
        config = {**_read_json(d / "special_tokens_map.json", {}), **_read_json(d / CONFIG_FILE, {})}
        return cls(_read_json(d / HF_FILE), config, read_chat_template(d), d.resolve().name)

    def _ranks(self, model: dict) -> tuple[dict[bytes, int], list[int] | None]:
        """(mergeable_ranks, rank_to_id): single bytes first, then each token at the position of the first merge
        that makes it; with ignore_merges, tokens no merge makes come last (whole pieces can still be them)."""
        to_byte = _unicode_to_byte()
        ids = {}  # bytes -> id
        for token, i in model["vocab"].items():
            if token in self.added:
                continue
            try:
                spelled = bytes(to_byte[c] for c in token)
            except KeyError:
                raise ValueError(f"{self.name}: vocabulary token {token!r} is not byte-level") from None
            ids[spelled] = i
            self.id_bytes.setdefault(i, spelled)
        singles = sorted((i, b) for b, i in ids.items() if len(b) == 1)
        if len(singles) != 256:
            raise ValueError(f"{self.name}: the vocabulary holds {len(singles)} of the 256 bytes; byte-level BPE "
                             f"needs them all")
        ranks = {b: r for r, (_, b) in enumerate(singles)}
        for merge in model["merges"]:
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            made = bytes(to_byte[c] for c in a + b)
            if made not in ids:
                raise ValueError(f"{self.name}: merge {a!r} {b!r} makes a token missing from the vocabulary")
            ranks.setdefault(made, len(ranks))
        if model.get("ignore_merges"):
            for token in ids:
                ranks.setdefault(token, len(ranks))
        rank_to_id = [ids[token] for token in sorted(ranks, key=ranks.get)]
        merged = rank_to_id[256:]
        if all(a < b for a, b in zip(merged, merged[1:])):  # ids in merge order: they can be the ranks
            return {token: ids[token] for token in ranks}, None
        return ranks, rank_to_id

    # ---- encoding ----

    def id_of(self, token: str | None) -> int | None:
        """The id of a token's text (an added token or a vocabulary entry), None if there is none."""
        if token is None:
            return None
        return self.added[token]["id"] if token in self.added else self.data["model"]["vocab"].get(token)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """transformers' ids of `text` (as `tokenizer(text, add_special_tokens=False)`). Added tokens that are
        not special always count, as there; special ones only with allow_special (transformers always cuts
        them out, which lets text inject control tokens)."""
        pattern = self.added_patterns[allow_special]
        if pattern is None:
            return self._encode_ordinary(text)
        ids, pos = [], 0
        for match in pattern.finditer(text):
            if match.start() < pos:  # inside whitespace an rstrip token took
                continue
            token = self.added[match.group()]
            before = text[pos:match.start()]
            ids += self._encode_ordinary(before.rstrip() if token.get("lstrip") else before)
            ids.append(token["id"])
            pos = match.end()
            if token.get("rstrip"):  # the token takes the whitespace after it
                pos += len(text[pos:]) - len(text[pos:].lstrip())
        return ids + self._encode_ordinary(text[pos:])

    def _normalize(self, text: str) -> str:
        for form in self.normal_forms:
            text = unicodedata.normalize(form, text)
        return text

    def _encode_ordinary(self, text: str) -> list[int]:
        pieces = [self._normalize(text)] if text else []
        for pattern in self.pre_splits:
            pieces = [part for piece in pieces for part in _split_isolated(pattern, piece)]
        ranks = [rank for piece in pieces for rank in self.enc.encode_ordinary(piece)]
        return ranks if self.rank_to_id is None else [self.rank_to_id[r] for r in ranks]

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.id_bytes.get(token_id, b"")  # ids past the tokenizer's (padding rows of the model): nothing

    # ---- chat ----

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template's text for messages, rendered with the variables transformers passes."""
        import jinja2

        if self.chat_template is None:
            raise ValueError(f"{self.name}: this tokenizer has no chat template (a base model); train_sft.py gives it "
                             f"ChatML, or pass --mode text to the demo")
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self.special_tokens_map)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.name}: the chat template refused the messages: {e}") from None

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
        return_assistant_mask: bool = False,
    ) -> list[int] | tuple[list[int], list[int]]:
        """The ids of transformers' `apply_chat_template(messages, add_generation_prompt)`: the template's text,
        encoded whole with its special tokens. The mask, if asked for, is 1 on each assistant message's content
        and the end-of-turn token after it (`im_end_id`), found in the text the ids spell."""
        ids = self.encode(self.render_chat(messages, add_generation_prompt), allow_special=True)
        return (ids, self._assistant_mask(messages, ids)) if return_assistant_mask else ids

    def _assistant_mask(self, messages: list[dict], ids: list[int]) -> list[int]:
        pieces = [self.token_bytes(i) for i in ids]
        ends = list(itertools.accumulate(len(p) for p in pieces))
        spelled = b"".join(pieces)
        mask, pos = [0] * len(ids), 0
        for message in messages:  # each message's content, in order (templates may strip it)
            content = self._normalize(message["content"])
            for needle in (content.encode(), content.strip().encode()):
                start = spelled.find(needle, pos)
                if start >= 0:
                    break
            if start < 0:
                if message["role"] == "assistant":
                    raise ValueError(f"{self.name}: the chat template changes an assistant message's text, so its "
                                     f"tokens cannot be found for the loss mask")
                continue
            pos = start + len(needle)
            if message["role"] != "assistant":
                continue
            j = bisect.bisect_right(ends, start)  # the first token that ends after the content starts
            while j < len(ids) and ends[j] - len(pieces[j]) < pos:
                mask[j] = 1
                j += 1
            if j < len(ids) and ids[j] == self.im_end_id:  # what stops the model: learned too
                mask[j] = 1
        return mask

    def _find_turn_end(self) -> int:
        """The added token a template writes right after an assistant's reply (<|im_end|>, <|eot_id|>, </s>);
        the end-of-sequence token if the template writes none or cannot be rendered."""
        if self.chat_template is None:
            return self._eot_id
        probe = "Reply4711"
        try:
            text = self.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}])
        except ValueError:
            return self._eot_id
        after = text[text.find(probe) + len(probe):] if probe in text else ""
        found = [c for c in self.added if after.startswith(c)]
        return self.added[max(found, key=len)]["id"] if found else self._eot_id

    def with_chatml(self) -> HFTokenizer:
        """This tokenizer with ChatML for a model that has no chat template: <|im_start|> and <|im_end|> as new
        special tokens after its largest id (where missing), and our ChatML template."""
        added, config = list(self.data.get("added_tokens") or []), dict(self.config)
        next_id = self.vocab_size
        for content in (IM_START, IM_END):
            if content not in self.added:
                token = {"id": next_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                         "normalized": False, "special": True}
                added.append(token)
                if "added_tokens_decoder" in config:
                    config["added_tokens_decoder"] = {**config["added_tokens_decoder"],
                                                      str(next_id): {k: v for k, v in token.items() if k != "id"}}
                next_id += 1
        return HFTokenizer({**self.data, "added_tokens": added}, config, CHATML_TEMPLATE, self.name)

    # ---- storage ----

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The Hugging Face files: tokenizer.json and tokenizer_config.json (with the chat template)."""
        self.save_hf(directory)

    def save_hf(self, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
        # PreTrainedTokenizerFast: transformers then runs tokenizer.json as it is, where a model-specific class
        # (GPT2Tokenizer, which SmolLM2 names) would rebuild the pre-tokenizer and drop a step such as Digits.
        config = {**self.config, "tokenizer_class": "PreTrainedTokenizerFast"}
        config.pop("chat_template", None)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        os.makedirs(directory, exist_ok=True)
        write_json(os.path.join(directory, HF_FILE), self.data)
        write_json(os.path.join(directory, CONFIG_FILE), config)

    def fingerprint(self) -> bytes:
        """A digest of tokenizer.json, the special tokens and the chat template: beyond the ranks, the normalizer,
        the pre-tokenizer steps, the ids of the ranks and the chat template decide this tokenizer's ids."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.data, self.special_tokens_map, self.chat_template], sort_keys=True).encode())
        return h.digest()

    # ---- properties ----

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        """The end-of-sequence token (tokenizer_config.json's eos_token)."""
        return self._eot_id

    @property
    def im_end_id(self) -> int:
        """The token that ends an assistant's turn in the chat template (the end-of-sequence token without one)."""
        return self._turn_end_id

    @property
    def im_start_id(self) -> int | None:
        return self.added[IM_START]["id"] if IM_START in self.added else None

    @property
    def pad_id(self) -> int:
        """tokenizer_config.json's pad_token, else the end-of-sequence token (padding is never trained on)."""
        return self._pad_id


def read_chat_template(directory) -> str | None:
    """A Hugging Face directory's chat template: chat_template.jinja, else tokenizer_config.json's chat_template
    (a list of named templates: the 'default' one), as transformers picks it."""
    d = Path(directory)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(d / CONFIG_FILE, {}).get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _read_json(path: Path, default=None):
    if not path.exists() and default is not None:
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None


def _token_content(value) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with its content."""
    return value.get("content") if isinstance(value, dict) else value


def _pre_tokenizer_steps(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    return spec.get("pretokenizers", []) if spec["type"] == "Sequence" else [spec]


def _split_patterns(steps: list[dict], name: str) -> list[str]:
    """The regexes of the pre-tokenizer chain, in order, each isolating its matches (a trailing ByteLevel with
    use_regex adds GPT-2's); one-line errors for any other step."""
    patterns = []
    for i, step in enumerate(steps):
        kind = step["type"]
        if kind == "ByteLevel":
            if i != len(steps) - 1 or step.get("add_prefix_space"):
                raise ValueError(f"{name}: ByteLevel must be the last pre-tokenizer, without add_prefix_space")
            if step.get("use_regex", True):
                patterns.append(GPT2_PAT)
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step["pattern"]
            patterns.append(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))
        elif kind == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        else:
            raise ValueError(f"{name}: pre-tokenizer {kind} {step.get('behavior', '')} is not supported (only Split "
                             f"isolating its matches, Digits and ByteLevel)")
    return patterns or [r"[\s\S]+"]


def _normal_forms(spec: dict | None, name: str) -> list[str]:
    if not spec:
        return []
    if spec["type"] == "Sequence":
        return [form for inner in spec["normalizers"] for form in _normal_forms(inner, name)]
    if spec["type"] not in ("NFC", "NFD", "NFKC", "NFKD"):
        raise ValueError(f"{name}: normalizer {spec['type']} is not supported (only NFC, NFD, NFKC, NFKD)")
    return [spec["type"]]


def _split_isolated(pattern, text: str) -> list[str]:
    """text cut into the pattern's matches and the stretches between them (tokenizers' 'Isolated')."""
    pieces, pos = [], 0
    for match in pattern.finditer(text):
        if match.start() > pos:
            pieces.append(text[pos:match.start()])
        if match.end() > match.start():
            pieces.append(match.group())
        pos = match.end()
    return pieces + [text[pos:]] if pos < len(text) else pieces


def _added_pattern(tokens: list[dict]):
    """A regex matching any of the added tokens, the longest first; single_word ones not inside a word."""
    if not tokens:
        return None
    alternatives = []
    for token in sorted(tokens, key=lambda t: len(t["content"]), reverse=True):
        text = re.escape(token["content"])
        alternatives.append(rf"(?<!\w){text}(?!\w)" if token.get("single_word") else text)
    return re.compile("|".join(alternatives))


@lru_cache
def _compile_template(source: str):
    """A chat template compiled as transformers compiles it: a sandbox, trim_blocks and lstrip_blocks, loop
    controls, its tojson filter, raise_exception and strftime_now; {% generation %} blocks render as is."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class StreamDecoder:
    """Token ids in, text out as soon as it is printable.

    A multi-byte UTF-8 character (Chinese, emoji) is often split over several tokens: its bytes are held
    back until the character is complete, so a stream never prints half a character as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held back (invalid bytes become U+FFFD, as in Tokenizer.decode)."""
        return self.utf8.decode(b"", final=True)
