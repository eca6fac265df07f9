"""A teacher's top-K next-token log-probabilities on a data set, computed once and kept on disk
(train_distill.py --teacher_topk K): later epochs, and a resumed run, need neither the teacher's memory nor its time.

A store is a directory of flat arrays with one entry per trained token (a position whose loss_mask is not 0), row
after row in the data set's order:
  ids.bin      (entries, K) the teacher's K most likely next tokens (uint16, or uint32 for larger vocabularies)
  logps.bin    (entries, K + 1) float16 log-probabilities at the distillation temperature: of those K tokens, then of
               all other tokens together (loss.topk_logps)
  offsets.bin  int64, rows + 1 of them: row i's entries are [offsets[i], offsets[i + 1])
  meta.json    what it holds and what it was made from (written last)
Its name holds a hash of the teacher's weights, the rows (data.identity()), K, the temperature and the precision the
teacher ran in, so a change of any of them makes a store of its own. It is built under a temporary name and renamed
when complete. The arrays are read through memory maps, a batch at a time.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fileio import write_json
from loss import topk_logps
from tokencache import building, read_array

FORMAT = 1


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of a model's weights (names, shapes and values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def store_dir(data, teacher: torch.nn.Module, k: int, temperature: float, dtype: torch.dtype) -> Path:
    """Where the store of `data` (a dataset.RowDataset) for this teacher and these settings lives: beside the
    data's own cache."""
    home, rows = data.identity()
    key = f"{FORMAT} {weights_digest(teacher)} {rows} k {k} temperature {temperature!r} {dtype}"
    return home.with_name(f"{home.name}.teacher-top{k}-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}")


@torch.no_grad()
def write_store(directory: Path, data, teacher_logits: Callable[[dict], torch.Tensor], k: int, temperature: float,
                vocab_size: int, batch_size: int, log=print) -> None:
    """Run the teacher over every row of `data` (teacher_logits(batch) -> (B, T, vocab_size) logits, on any device)
    and write the top-k store of its trained tokens into `directory`, atomically."""
    id_dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    offsets = [0]
    with building(directory) as tmp:
        with open(tmp / "ids.bin", "wb") as ids_file, open(tmp / "logps.bin", "wb") as logps_file:
            for start in tqdm(range(0, len(data), batch_size), desc=f"teacher top-{k} (once)", unit=" batches",
                              mininterval=5):
                batch = data.batch(range(start, min(start + batch_size, len(data))))
                logits = teacher_logits(batch)[..., :vocab_size]
                trained = batch["loss_mask"].to(logits.device) != 0
                logits = logits[trained].float()  # (trained tokens, vocab), row after row
                ids = logits.topk(k, dim=-1).indices
                ids.cpu().numpy().astype(id_dtype).tofile(ids_file)
                topk_logps(logits, ids, temperature).cpu().numpy().astype(np.float16).tofile(logps_file)
                offsets += (offsets[-1] + trained.sum(1).cumsum(0)).tolist()
        np.asarray(offsets, dtype=np.int64).tofile(tmp / "offsets.bin")
        write_json(tmp / "meta.json", {"format": FORMAT, "k": k, "temperature": temperature, "rows": len(data),
                                       "entries": offsets[-1], "id_dtype": np.dtype(id_dtype).name,
                                       "rows_key": data.identity()[1]})
    size = sum(f.stat().st_size for f in directory.iterdir())
    log(f"{directory}: the teacher's top {k} of {offsets[-1]:,} trained tokens, {size / 2**20:.1f} MiB")


class TeacherTopK:
    """A store written by write_store: `batch(indices, loss_mask)` gives the teacher's entries of those rows."""

    def __init__(self, directory):
        directory = Path(directory)
        self.meta = json.loads((directory / "meta.json").read_text())
        self.k = self.meta["k"]
        self.offsets = read_array(directory / "offsets.bin", np.int64)
        self.ids = read_array(directory / "ids.bin", np.dtype(self.meta["id_dtype"])).reshape(-1, self.k)
        self.logps = read_array(directory / "logps.bin", np.float16).reshape(-1, self.k + 1)

    def batch(self, indices, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """teacher_ids (B, T, K) and teacher_logps (B, T, K + 1) for rows `indices` of a batch whose loss_mask is
        (B, T): row i's entries fill its trained positions in order (elsewhere 0, which the loss never reads)."""
        B, T = loss_mask.shape
        out = {"teacher_ids": torch.zeros((B, T, self.k), dtype=torch.long),
               "teacher_logps": torch.zeros((B, T, self.k + 1), dtype=torch.float32)}
        for row, i in enumerate(indices):
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            trained = loss_mask[row] != 0
            if int(trained.sum()) != end - start:
                raise ValueError(f"the teacher store has {end - start} entries for row {i}, whose batch trains "
                                   f"{int(trained.sum())} tokens: it was made from other data; delete it")
            out["teacher_ids"][row, trained] = torch.from_numpy(self.ids[start:end].astype(np.int64))
            out["teacher_logps"][row, trained] = torch.from_numpy(self.logps[start:end].astype(np.float32))
        return out
