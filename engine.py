"""Continuous batching: many generations share one decode loop (the engine behind serve.py).

Every active sequence owns one row (a slot) of a batched KV cache and sits at its own position in it.
One `Engine.step`:
  1. sequences that are done (finished, cancelled because the client went away, or out of time) leave,
     and the last active row moves into each freed one, so the active sequences are always rows 0..n-1;
  2. waiting sequences join the free rows: their prompts run through the model together (right-padded),
     which fills their rows of the cache, and their first tokens are sampled;
  3. one decode step feeds every active row its newest token at its own position and samples each row's
     next token with the row's own settings and random generator.
`GPT.forward(positions=...)` does the per-row work: each row gets the RoPE angles of its own positions, its
keys and values are written at its own cache indices, and `attention.position_mask` hides the cache entries
beyond its position (those of a longer neighbour, or the padding of its own prefill). Sequences join and
leave between steps, so a short request never waits for the longest one of a batch, and a new one waits at
most one step to start.
"""

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model import GPT
from sampling import apply_repetition_penalty, sample_next


class QueueFull(Exception):
    """Raised by `Engine.submit` when max_queue sequences are already waiting for a slot."""


@dataclass
class SamplingParams:
    """How one sequence is generated (sampling.py's settings, per sequence)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None  # None = a fresh random seed
    stop_ids: tuple[int, ...] = ()  # generation ends when one of these is sampled (it is not added)


class Sequence:
    """One generation: its prompt, its settings, the tokens generated so far and how it ended.

    The engine thread appends to `tokens` and finally sets `finish_reason` ('stop', 'length', 'timeout',
    'cancelled' or 'error'); after each change it calls `notify()`, so that a reader in another thread can
    take the new tokens (appending to a list is atomic in Python, so readers never see half an update).
    """

    def __init__(self, prompt: list[int], params: SamplingParams, notify: Callable[[], None] = lambda: None,
                 timeout: float | None = None):
        self.prompt = list(prompt)
        self.params = params
        self.notify = notify
        self.deadline = time.monotonic() + timeout if timeout else None
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False  # set by any thread (Engine.cancel); the engine drops the sequence at its next step

    def finish(self, reason: str):
        if self.finish_reason is None:
            self.finish_reason = reason
            self.notify()

    def add(self, token: int, max_seq_len: int):
        """Take a sampled token: the end at a stop id, at max_tokens or where the context is full."""
        if token in self.params.stop_ids:
            return self.finish("stop")
        self.tokens.append(token)
        self.notify()
        if len(self.tokens) >= self.params.max_tokens or len(self.prompt) + len(self.tokens) >= max_seq_len:
            self.finish("length")

    def why_leave(self) -> str | None:
        """The reason this sequence must leave its slot now, if any."""
        if self.cancelled:
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "timeout"
        return self.finish_reason


class Engine:
    """Runs any number of `Sequence`s through one model, max_batch at a time (continuous batching)."""

    def __init__(self, model: GPT, max_batch: int = 16, max_queue: int = 64):
        self.model = model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_seq_len = model.config.max_seq_len
        self.device = model.embed.weight.device
        self.cache = model.new_kv_cache(max_batch)
        self.active: list[Sequence] = []  # active[i] owns row i of the cache
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.wakeup = threading.Condition()  # guards `waiting`; the loop sleeps on it while there is no work
        self.stopping = False

    # ---- called from any thread
    def submit(self, seq: Sequence):
        """Queue a sequence for generation; raises QueueFull when the waiting queue is full."""
        if not 1 <= len(seq.prompt) < self.max_seq_len:
            raise ValueError(f"a prompt must have 1 to {self.max_seq_len - 1} tokens, got {len(seq.prompt)}")
        with self.wakeup:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting for a slot")
            self.waiting.append(seq)
            self.wakeup.notify()

    def cancel(self, seq: Sequence):
        """Stop generating seq; its slot is freed at the next step."""
        seq.cancelled = True
        with self.wakeup:
            self.wakeup.notify()

    def load(self) -> dict:
        """Sequences generating, sequences waiting for a row, and rows (GET /health shows them)."""
        return {"active": len(self.active), "waiting": len(self.waiting), "slots": self.max_batch}

    # ---- the loop (one thread)
    def run(self):
        """Step until stop(); sleep while there is nothing to do. A failing step fails its sequences only."""
        while True:
            with self.wakeup:
                while not (self.active or self.waiting or self.stopping):
                    self.wakeup.wait()
                if self.stopping:
                    break
            try:
                self.step()
            except Exception:  # a bug or out of memory: end the sequences in flight, keep serving the others
                for seq in self.active:
                    seq.finish("error")
                self.active = []
                logging.getLogger(__name__).exception("generation step failed")

    def stop(self):
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()

    @torch.no_grad()
    def step(self):
        """Leave, join, decode: one round of the loop (see the module docstring)."""
        self.leave()
        self.join()
        self.leave()  # those that ended at their first token
        if self.active:
            n = len(self.active)
            ids = torch.tensor([[seq.tokens[-1]] for seq in self.active], device=self.device)
            positions = torch.tensor([[len(seq.prompt) + len(seq.tokens) - 1] for seq in self.active],
                                     device=self.device)
            logits = self.model(ids, cache=self.cache.rows(0, n), positions=positions)
            self.sample(self.active, logits[:, -1])

    def leave(self):
        """Free the rows of the sequences that are done; drop cancelled or expired waiting ones."""
        with self.wakeup:
            for seq in list(self.waiting):
                reason = seq.why_leave()
                if reason is not None:
                    self.waiting.remove(seq)
                    seq.finish(reason)
        i = 0
        while i < len(self.active):
            reason = self.active[i].why_leave()
            if reason is None:
                i += 1
                continue
            self.active[i].finish(reason)
            last = len(self.active) - 1
            if i != last:  # the last row moves into the freed one: the active rows stay 0..n-1
                for buffer in self.cache.k + self.cache.v:
                    buffer[i] = buffer[last]
                self.active[i] = self.active[last]
            self.active.pop()

    def join(self):
        """Prefill waiting sequences into the free rows, all in one forward, and sample their first tokens."""
        with self.wakeup:
            new = []
            while self.waiting and len(self.active) + len(new) < self.max_batch:
                new.append(self.waiting.popleft())
        if not new:
            return
        lengths = torch.tensor([len(seq.prompt) for seq in new], device=self.device)
        ids = torch.zeros(len(new), int(lengths.max()), dtype=torch.long, device=self.device)
        for row, seq in enumerate(new):  # right padding: it lands beyond each prompt, where no query looks
            ids[row, :len(seq.prompt)] = torch.tensor(seq.prompt)
        positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        first = len(self.active)
        self.active += new  # before the forward: if it fails, run() ends these sequences too
        logits = self.model(ids, cache=self.cache.rows(first, first + len(new)), positions=positions)
        self.sample(new, logits[torch.arange(len(new)), lengths - 1])

    def sample(self, seqs: list[Sequence], logits: torch.Tensor):
        """Each sequence's next token from its row of logits (B, V), with its own settings."""
        for seq, row in zip(seqs, logits.float().cpu()):  # the generators live on the CPU
            p = seq.params
            row = apply_repetition_penalty(row[None], torch.tensor([seq.prompt + seq.tokens]), p.repetition_penalty)
            token = sample_next(row, p.temperature, p.top_k, p.top_p, seq.generator)
            seq.add(int(token), self.max_seq_len)
