"""Training data: random windows from the prepared token files, drawn by a resumable sampler."""

import json
from pathlib import Path

import numpy as np
import torch


class WindowSampler:
    """Deterministic random window starts: batch number n of rank r depends only on (seed, r, n).

    Its whole state is `position`, the number of batches drawn, so a resumed run draws exactly the
    batches the interrupted run would have drawn next.
    """

    def __init__(self, n_tokens: int, window: int, batch_size: int, seed: int, rank: int = 0):
        if n_tokens <= window:
            raise ValueError(f"{n_tokens} tokens are too few for windows of {window} tokens")
        self.n_starts = n_tokens - window
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.position = 0

    def next(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.rank, self.position])
        self.position += 1
        return rng.integers(0, self.n_starts, size=self.batch_size)

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

    def sampler(self, batch_size: int, seed: int, rank: int = 0) -> WindowSampler:
        return WindowSampler(len(self.tokens), self.seq_len + 1, batch_size, seed, rank)

    def batch(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        """input_ids and labels (B, seq_len): labels are the inputs shifted by one token."""
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
