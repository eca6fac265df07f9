"""One training loop for every stage.

`Trainer` owns the loop: device and precision, DDP, gradient accumulation and clipping, the learning-rate
schedule, evaluation, logging and checkpoints. A stage subclasses it and overrides only what differs:
  build_model()   which weights to start from
  build_data()    its datasets and samplers (and, for chat stages, the held-out chats of answer_chats)
  next_batch()    the next training micro-batch (a dict of tensors)
  compute_loss()  the loss of one micro-batch, plus metrics to log
Evaluation is the same for every stage: compute_loss averaged over eval_batches(), plus the answer accuracy.
Read `Trainer.train` top to bottom for the whole loop.
"""

import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import cached_property, partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import lora
import quant
from checkpoint import (
    best_checkpoint,
    describe,
    latest_checkpoint,
    load_run_info,
    load_train_state,
    save_checkpoint,
)
from configs import SFTConfig, TrainConfig, exit_on_bad_input, get_config
from dataset import (
    PreferenceDataset,
    PretrainDataset,
    SFTDataset,
    TextWindows,
    format_mask,
    load_chats,
    shift_chat,
    token_weights,
)
from devices import EagerFallback, autocast, peak_memory, pick_compile, pick_device, pick_dtype
from evals import answer_accuracy
from fileio import data_file, writable_dir
from flops import mfu
from hf import resolve
from loss import DPOLoss, generalized_jsd, lm_loss, sequence_logps, topk_jsd
from model import GPT
from moe import collect_moe_stats
from plan import plan_for
from prepare import data_path
from pretrained import load_pretrained, needs_chatml
from teachercache import TeacherTopK, store_dir, write_store
from tokencache import is_complete
from tokenizer import Tokenizer


class Stopped(KeyboardInterrupt):
    """Training stopped by a signal, after saving; `signum` is the signal's number (for the exit status)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While training, Ctrl-C (SIGINT) and SIGTERM (`kill`, job schedulers) ask the loop to stop after the step
    under way, where the weights, optimizer, RNG and data position agree, so that the checkpoint it then saves
    resumes exactly. A second signal stops at once, without saving (the last checkpoint is kept).
    Only the main thread can handle signals; elsewhere this does nothing."""

    def __init__(self, log):
        self.log, self.received, self.previous = log, 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signum
        self.log(f"{signal.Signals(signum).name}: stopping after this step to save for --resume (send it again to "
                 f"stop at once, without saving)")

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_out_dir(out_dir: Path, stage: str, resume: bool, overwrite: bool) -> None:
    """A fresh run never replaces a checkpoint unasked, --resume needs one of its stage, and out_dir must be
    writable: one-line errors, before anything is loaded."""
    try:
        saved = load_run_info(out_dir)
    except FileNotFoundError:
        saved = None
    if resume and saved is None:
        raise FileNotFoundError(f"--resume: {out_dir} holds no checkpoint to continue; leave out --resume to start "
                                f"a run there")
    if resume and saved.get("stage", stage) != stage:
        raise ValueError(f"--resume: {out_dir} holds a checkpoint of the {saved['stage']} stage, not {stage}")
    if saved is not None and not resume and not overwrite:
        raise ValueError(f"{out_dir} already holds a {saved.get('stage', '')} checkpoint (step {saved.get('step')}): "
                         f"pass --resume to continue it, --overwrite to replace it, or another --out_dir")
    writable_dir(out_dir, "--out_dir")


class Trainer:
    stage = "pretrain"

    def __init__(self, cfg: TrainConfig, model_overrides: dict | None = None):
        self.cfg = cfg
        self.model_overrides = model_overrides or {}
        self.out_dir = Path(cfg.out_dir or f"checkpoint/{self.stage}")
        check_out_dir(self.out_dir, self.stage, cfg.resume, cfg.overwrite)
        self._setup_distributed()
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        torch.manual_seed(cfg.seed + self.rank)
        self.step = self.tokens_seen = 0
        self.started = time.time()
        self.best: tuple[float, ...] | None = None  # the score (see score()) of the model in out_dir/best
        self.metrics_bytes = 0  # the length of metrics.jsonl that belongs to this run (resume: at its save)
        self.answer_chats: list[list[dict]] = []  # held-out chats for the answer accuracy (set by chat stages)

        self.model, self.tokenizer = self.build_model()  # also sets self.init_source
        self.model.to(self.device)
        self.model.grad_checkpoint = cfg.grad_checkpoint
        self.seq_len = cfg.seq_len or self.model.config.max_seq_len
        if self.seq_len > self.model.config.max_seq_len:
            raise ValueError(f"--seq_len {self.seq_len} is longer than the model's context (max_seq_len "
                             f"{self.model.config.max_seq_len})")
        if not (cfg.max_steps or cfg.max_tokens or cfg.epochs):  # no budget given: the device plan's
            planned = self.plan.budgets[self.stage].get("batch_size")
            if planned and cfg.batch_size == type(cfg).__dataclass_fields__["batch_size"].default:
                cfg.batch_size = planned  # the plan's batch, unless --batch_size was given
        self.build_data()
        self.set_max_steps()
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                                         self.device.type)
        if cfg.resume:
            self.load_state()
        compile_it = pick_compile(cfg.compile, self.device)
        self.run_step = partial(self.accumulate, self._wrap(self.model, compile_it))
        if compile_it:  # torch.compile fails lazily, in forward or backward: a failed step is run again eagerly
            self.run_step = EagerFallback(self.run_step, self._accumulate_eagerly, "training in eager mode", self.log)
        self.wandb = self._init_wandb() if cfg.wandb and self.master else None

    # ------------------------------------------------------------------ set-up
    def set_max_steps(self):
        """max_steps from the budget: --max_tokens or --epochs if given, else --max_steps if given, else the
        device plan's budget for this stage (plan.py), in tokens or passes over the data, so that it scales with
        the batch."""
        cfg = self.cfg
        if cfg.max_tokens > 0 or cfg.epochs > 0:
            budget, source = {"max_tokens": cfg.max_tokens, "epochs": cfg.epochs}, "the command line"
        elif cfg.max_steps > 0:
            return
        else:
            budget, source = self.plan.budgets[self.stage], f"the {self.device.type} plan"
        rows = cfg.batch_size * cfg.grad_accum * self.world  # rows a step
        if budget.get("max_tokens"):
            cfg.max_steps = math.ceil(budget["max_tokens"] / (rows * self.seq_len))
            what = f"{budget['max_tokens'] / 1e6:g}M tokens"
        else:
            cfg.max_steps = math.ceil(budget["epochs"] * self.rows_per_epoch() / rows)
            what = f"{budget['epochs']:g} passes over {self.rows_per_epoch()} rows"
        self.log(f"budget from {source}: {what} = {cfg.max_steps} steps of {rows} rows")

    @cached_property
    def plan(self):
        """The device's plan for a run with no arguments (plan.py), said once."""
        plan = plan_for(self.device.type)
        self.log(f"plan for {self.device.type}: {plan.why} (plan.py)")
        return plan

    def _setup_distributed(self):
        """Under torchrun, join the process group: NCCL on CUDA, gloo on CPU."""
        self.ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if self.ddp:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            if torch.cuda.is_available() and self.cfg.device in ("auto", "cuda"):
                self.device = torch.device("cuda", local_rank)
                torch.cuda.set_device(self.device)
            else:
                self.device = pick_device(self.cfg.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        else:
            self.rank, self.world = 0, 1
            self.device = pick_device(self.cfg.device)
        self.master = self.rank == 0

    def _wrap(self, model, compile_it: bool):
        """torch.compile (if asked) and DDP around the model the loop trains."""
        if compile_it:
            model = torch.compile(model)
        if self.ddp:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    @cached_property
    def eager_model(self):
        """The trained model without torch.compile, made when a compiled step fails."""
        return self._wrap(self.model, compile_it=False)

    def autocast(self):
        """A mixed-precision context for one region (forward and loss); none in float32."""
        return autocast(self.device, self.dtype)

    def _init_wandb(self):
        import wandb

        return wandb.init(project=self.cfg.wandb_project, name=f"{self.stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                          config={"train": asdict(self.cfg), "model": asdict(self.model.config)},
                          dir=str(self.out_dir.parent))

    def log(self, message: str):
        if self.master:
            tqdm.write(message)

    @contextmanager
    def rank_zero_first(self):
        """Under DDP, rank 0 runs the block first (e.g. to build a data cache), the other ranks after it."""
        if self.ddp and not self.master:
            dist.barrier()
        yield
        if self.ddp and self.master:
            dist.barrier()

    # ------------------------------------------------------------------ stage hooks
    def build_model(self) -> tuple[GPT, Tokenizer]:
        """Pretraining: a fresh model of the preset, shaped for the data's tokenizer (or the checkpoint
        in init_from / out_dir when resuming). Sets init_source, the checkpoint the run started from."""
        self.init_source = self.cfg.init_from
        data_tokenizer = Tokenizer.from_pretrained(data_path(self.cfg.data_dir))
        source = self.out_dir if self.cfg.resume else self.cfg.init_from
        if source:
            model, tokenizer = self.load_pretrained(source)
            if tokenizer.fingerprint() != data_tokenizer.fingerprint():
                raise ValueError(f"{self.cfg.data_dir} was tokenised by another tokenizer ({data_tokenizer.name}) than "
                                 f"the one {source} was trained with ({tokenizer.name}): the model would read its "
                                 f"ids as other text. Prepare the data with the checkpoint's tokenizer (python "
                                 f"prepare.py --tokenizer {source} ...) or start a fresh run")
            return model, tokenizer
        return self.new_model(data_tokenizer), data_tokenizer

    def new_model(self, tokenizer: Tokenizer) -> GPT:
        """A fresh model of --preset ('auto': tiny on a CPU, else minimind2-small) and the model flags, shaped for
        the tokenizer."""
        preset = self.cfg.preset
        if preset == "auto":
            preset = self.plan.preset
        config = get_config(preset, **{"vocab_size": tokenizer.vocab_size, **self.model_overrides})
        if config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model vocab_size {config.vocab_size} < tokenizer's {tokenizer.vocab_size}")
        model = GPT(config)
        self.log(f"new {preset} model ({model.describe_size()})")
        return model

    def start_dir(self, stages: tuple[str, ...]) -> Path:
        """The checkpoint a fine-tuning stage starts from (find_init_dir), saying which it took."""
        directory = find_init_dir(self.cfg.init_from, stages)
        if not self.cfg.init_from:
            self.log(f"starting from {describe(directory)}, the default (--init_from picks another)")
        return directory

    def load_pretrained(self, directory) -> tuple[GPT, Tokenizer]:
        """Model (with any model-field overrides such as dropout) and tokenizer of a checkpoint or a Hugging Face
        model (pretrained.load_pretrained)."""
        model, tokenizer = load_pretrained(directory, overrides=self.model_overrides, log=self.log)
        self.log(f"loaded {directory} ({model.describe_size()})")
        return model, tokenizer

    def build_data(self):
        data_dir = data_path(self.cfg.data_dir)
        self.train_data = PretrainDataset(data_dir, "train", self.seq_len)
        self.val_data = PretrainDataset(data_dir, "val", self.seq_len)
        self.sampler = self.train_data.sampler(self.cfg.batch_size, self.cfg.seed, self.rank, self.world)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.to_device(self.train_data.batch(self.sampler.next()))

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = lm_loss(model(batch["input_ids"]), batch["labels"])
        return loss, {}

    def eval_batches(self, split: str):
        """The batches that evaluate `split`: the same eval_iters batches each time, so that evaluations compare
        (pretraining: fixed random windows, each rank its share; chats and pairs: the first rows)."""
        data = {"train": self.train_data, "val": self.val_data}[split]
        if data is not None:
            for batch in data.eval_batches(self.cfg.batch_size, self.cfg.eval_iters, self.rank, self.world):
                yield self.to_device(batch)

    def rows_per_epoch(self) -> int:
        """Training rows in one pass over the data, for --epochs."""
        return len(self.train_data)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The loss on the train and the validation split (train_loss, val_loss, as nanoGPT's estimate_loss), the
        stage's other metrics on the validation split (val_<metric>), and the answer accuracy of greedy replies
        to answer_chats."""
        train, val = self.mean_loss("train"), self.mean_loss("val")
        results = {"train_loss": train["loss"]} if train else {}
        results.update({f"val_{name}": value for name, value in val.items()})
        if self.answer_chats:  # the same on every rank: no reduction needed
            with self.autocast():
                results.update(answer_accuracy(self.model, self.tokenizer, self.answer_chats,
                                               self.cfg.max_new_tokens))
        return results

    def mean_loss(self, split: str) -> dict[str, float]:
        """compute_loss's loss and metrics averaged over the rows of eval_batches(split)."""
        totals: dict[str, torch.Tensor] = {}
        rows = 0
        for batch in self.eval_batches(split):
            with self.autocast():
                loss, metrics = self.compute_loss(self.model, batch)
            n = len(batch["input_ids"])
            for name, value in {"loss": loss, **metrics}.items():
                totals[name] = totals.get(name, 0) + value.detach().float() * n
            rows += n
        return {name: self.all_reduce_mean(total / rows) for name, total in totals.items()}

    # ------------------------------------------------------------------ helpers for the stages
    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def all_reduce_max(self, value: int) -> int:
        """The largest of the ranks' values (one int; no communication without DDP)."""
        if not self.ddp:
            return value
        tensor = torch.tensor(value, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        if self.ddp:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world
        return value.item()

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        """Train to max_steps: evaluate at step 0 and every eval_interval steps, save every save_interval steps
        and at the end. Ctrl-C or SIGTERM stops after the step under way and saves (StopSignals), so that --resume
        continues from there."""
        cfg = self.cfg
        self.start_run()
        t_log, tokens_since_log = time.time(), 0
        bad_steps = 0
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.master, desc=self.stage,
                   dynamic_ncols=True, file=sys.stdout)
        try:
            with StopSignals(self.log) as signals:
                if self.step == 0:
                    results = self.run_eval()
                while self.step < cfg.max_steps:
                    signum = self.all_reduce_max(signals.received)  # every rank stops at the same step
                    if signum:
                        self.log(f"saving at step {self.step} so that --resume continues from here")
                        self.save()
                        raise Stopped(signum)
                    lr = self.lr_at(self.step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr

                    self.model.train()
                    batches = [self.next_batch() for _ in range(cfg.grad_accum)]
                    loss, metrics, loss_finite = self.run_step(batches)

                    self.scaler.unscale_(self.optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                    # One scalar read per step: a NaN/inf loss or gradient must not reach the weights.
                    if not (torch.isfinite(grad_norm) & loss_finite).item():
                        self.optimizer.zero_grad(set_to_none=True)
                        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
                        self.scaler.update()  # with fp16: a lower loss scale for the next step
                        if loss_finite.item() and scale > 1:
                            # fp16's gradient scaler finding its scale: gradients that overflowed at this scale are
                            # what it halves on, not a sign of divergence (GradScaler skips such steps by design).
                            continue
                        bad_steps += 1
                        self.log(f"step {self.step}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
                        if bad_steps >= 10:
                            raise FloatingPointError(f"{bad_steps} non-finite steps in a row at step {self.step}; "
                                                     f"stopping. The last good checkpoint in {self.out_dir} is kept; "
                                                     f"try a lower --lr")
                        continue
                    bad_steps = 0
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    bar.update(1)
                    step_tokens = sum(batch["input_ids"].numel() for batch in batches) * self.world
                    tokens_since_log += step_tokens
                    self.tokens_seen += step_tokens

                    last = self.step == cfg.max_steps
                    if self.step % cfg.log_interval == 0 or last:
                        dt = time.time() - t_log
                        record = {"loss": self.all_reduce_mean(loss.detach().float()), "lr": lr,
                                  "grad_norm": grad_norm.item(), "tokens_per_s": tokens_since_log / dt,
                                  "mfu": mfu(self.model.config, self.seq_len, tokens_since_log / dt, self.device,
                                             self.dtype, self.world),
                                  **{k: self.all_reduce_mean(v.detach().float()) for k, v in metrics.items()}}
                        self.write_metrics("train", record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                        tok_s=f"{record['tokens_per_s']:.0f}")
                        t_log, tokens_since_log = time.time(), 0
                    # Evaluate before saving, so a checkpoint's metrics.jsonl has its step's evaluation.
                    if self.step % cfg.eval_interval == 0 or last:
                        results = self.run_eval()
                    if self.step % cfg.save_interval == 0 or last:
                        self.save()
        except KeyboardInterrupt as e:
            if not isinstance(e, Stopped):
                self.log(f"stopped at once in step {self.step}: not saved, the last checkpoint in {self.out_dir} "
                         f"is kept")
            raise
        finally:
            bar.close()
        return results

    def accumulate(self, model, batches) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Forward and backward of one step's micro-batches on model, their gradients summed. Returns the last
        micro-batch's loss and metrics, and whether every loss was finite (a tensor: no sync with the GPU)."""
        loss_finite = torch.ones((), dtype=torch.bool, device=self.device)
        for i, batch in enumerate(batches):
            # Under DDP, gradients are all-reduced only on the last micro-batch.
            loss, metrics = self.forward_backward(model, batch, sync=i == len(batches) - 1)
            loss_finite &= torch.isfinite(loss.detach())
        return loss, metrics, loss_finite

    def _accumulate_eagerly(self, batches):
        """The step on the eager model, after a compiled step failed (perhaps half-way through its backward)."""
        self.optimizer.zero_grad(set_to_none=True)  # what the failed step left; no-op on later steps
        return self.accumulate(self.eager_model, batches)

    def forward_backward(self, model, batch, sync: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and backward of one micro-batch; under DDP, gradients are all-reduced only when sync."""
        with model.no_sync() if self.ddp and not sync else nullcontext():
            with self.autocast(), collect_moe_stats(self.model) as moe:
                loss, metrics = self.compute_loss(model, batch)
            if moe.aux_losses:  # MoE models: the load-balancing loss, in every stage
                loss = loss + self.model.config.aux_loss_alpha * moe.aux_loss()
                metrics = {**metrics, **moe.metrics()}
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
        return loss, metrics

    def run_eval(self) -> dict[str, float]:
        """Evaluate, log, and keep the model in out_dir/best if it is the best of the run so far."""
        self.model.eval()
        results = self.evaluate()
        self.write_metrics("val", results)
        self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        score = self.score(results)
        if self.step > 0 and score and (self.best is None or score > self.best):  # step 0: the untrained start
            self.best = score
            if self.master:
                self.write_checkpoint(self.out_dir / "best", {**self.run_info(), "metrics": results})
        return results

    def score(self, results: dict[str, float]) -> tuple[float, ...]:
        """How evaluations rank for out_dir/best, higher is better: by answer accuracy where the stage measures
        it, then by validation loss."""
        return tuple(x for x in (results.get("answer_acc"), -results.get("val_loss", math.nan)) if x == x)  # not nan

    def start_run(self):
        """metrics.jsonl and best/ hold one run: a fresh run starts without them (the checkpoint it replaces keeps
        until its first save), a resumed one cuts metrics.jsonl back to where its checkpoint was saved (a crash
        since may have logged steps that are now trained again)."""
        if not self.master:
            return
        path = self.out_dir / "metrics.jsonl"
        if path.exists() and path.stat().st_size > self.metrics_bytes:
            os.truncate(path, self.metrics_bytes)
        if not self.cfg.resume:
            shutil.rmtree(self.out_dir / "best", ignore_errors=True)

    def write_metrics(self, split: str, record: dict):
        if not self.master:
            return
        record = {"step": self.step, "tokens": self.tokens_seen, "split": split, "time": time.time(), **record}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")},
                           step=self.step)

    # ------------------------------------------------------------------ checkpoints
    def run_info(self) -> dict:
        return {"stage": self.stage, "step": self.step, "init_from": self.init_source,
                "train_config": asdict(self.cfg), "argv": sys.argv, "tokens_seen": self.tokens_seen,
                "wall_time_s": time.time() - self.started, "peak_memory": peak_memory()}

    def train_state(self) -> dict:
        """Everything besides the weights that --resume needs to continue exactly."""
        metrics = self.out_dir / "metrics.jsonl"
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(), "tokens_seen": self.tokens_seen,
                "wall_time_s": time.time() - self.started, "best": self.best, **self.rank_state(),
                "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0}

    def save(self):
        """Write the checkpoint (rank 0 only; the others wait so no rank runs ahead of a save)."""
        rank_rng = None
        if self.ddp:  # each rank's own state (its RNG: its dropout stream), so every rank resumes exactly
            rank_rng = [None] * self.world
            dist.all_gather_object(rank_rng, self.rank_state())
        if self.master:
            state = self.train_state()
            if rank_rng is not None:
                state["rank_rng"] = rank_rng
            self.write_checkpoint(self.out_dir, self.run_info(), state)
        if self.ddp:
            dist.barrier()

    def write_checkpoint(self, directory, run_info: dict, train_state: dict | None = None):
        """Write a checkpoint of the model (rank 0 only): the full model; a LoRA stage writes only its adapters."""
        save_checkpoint(directory, self.model, self.tokenizer, run_info, train_state)

    def rank_state(self) -> dict:
        """What each rank keeps for itself and --resume restores on each: its RNG streams."""
        state = {"cpu_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_rank_state(self, state: dict):
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def load_state(self):
        """Restore optimizer, scaler, RNG and data position from out_dir (the weights came in build_model)."""
        state = load_train_state(self.out_dir)
        self.step = state["step"]
        if self.step >= self.cfg.max_steps:
            raise ValueError(f"--resume: {self.out_dir} is at step {self.step} already, and --max_steps is "
                             f"{self.cfg.max_steps}: raise --max_steps to train on")
        self.metrics_bytes = state.get("metrics_bytes", math.inf)  # checkpoints of older versions: keep it all
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rank_rng = state.get("rank_rng")
        self.load_rank_state(rank_rng[self.rank] if rank_rng and len(rank_rng) == self.world else state)
        self.sampler.load_state_dict(state["sampler"])
        self.tokens_seen = state.get("tokens_seen", 0)
        self.started -= state.get("wall_time_s", 0.0)  # wall time counts the interrupted run too
        self.best = tuple(state["best"]) if state.get("best") else None
        self.log(f"resuming {self.stage} from step {self.step} in {self.out_dir}")

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.ddp:
            dist.destroy_process_group()


class PretrainTrainer(Trainer):
    """Pretraining: next-token prediction on random windows of the token files (all in the base class)."""

    stage = "pretrain"


def run_stage(trainer_cls, cfg: TrainConfig, model_overrides: dict | None = None) -> dict[str, float]:
    """Entry point shared by the train_*.py scripts, given the parsed command line: train, report, clean up.

    Bad input (a missing file, a config that does not fit) ends with one line, not a traceback.
    """
    with exit_on_bad_input():
        trainer = trainer_cls(cfg, model_overrides)
    try:
        with exit_on_bad_input():
            results = trainer.train()
        trainer.log(f"saved {trainer.out_dir} at step {trainer.step}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        trainer.log(peak_memory())
        if trainer.master:
            from plots import write_curves  # matplotlib is slow to import: only once the run is done

            trainer.log(write_curves(trainer.out_dir))
        return results
    except torch.cuda.OutOfMemoryError as e:  # too large a batch for this GPU: the user's setting, not a bug
        sys.exit(f"error: {str(e).splitlines()[0]} Lower --batch_size (raising --grad_accum keeps the global batch), "
                 f"--seq_len, or use --grad_checkpoint")
    except Stopped as e:
        sys.exit(128 + e.signum)  # the shell's status for a process that the signal ended
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        trainer.close()


def find_init_dir(init_from: str, stages: tuple[str, ...]) -> Path:
    """The checkpoint to fine-tune: init_from if given, else the best model kept in checkpoint/<stage>/best (or
    the run's last, if it kept none) for the first of `stages` that has one (e.g. the SFT model if there is one,
    else the pretrained one)."""
    if init_from:
        return resolve(init_from)  # hf:ORG/NAME: its downloaded snapshot
    for stage in stages:
        found = latest_checkpoint("checkpoint", (stage,))
        if found is not None:
            return best_checkpoint(found)
    raise FileNotFoundError(f"no {' or '.join(stages)} checkpoint under checkpoint/: run "
                            f"`python train_{stages[-1]}.py` first, or pass --init_from DIR")


def load_answer_chats(cfg, given: str, log, name: str = "sft_val.jsonl") -> list[list[dict]]:
    """The first eval_samples held-out chats of a --sft_val_data style flag ('' = <data_dir>/<name>), whose
    first answers evaluate a chat stage; none with eval_samples 0."""
    source = chat_source(cfg, name, given) if cfg.eval_samples > 0 else None
    if source is None:
        return []
    chats, skipped = load_chats(source, limit=cfg.eval_samples, **cfg.read_options())
    log(f"{source}: answer accuracy on {len(chats)} chats" + (f", {skipped} malformed rows skipped" if skipped else ""))
    return chats


def check_files(*sources: str | None) -> None:
    """Every data file named exists (hf: sources and None aside): checked before the first is tokenised, which
    can take minutes."""
    for source in sources:
        if source and not source.startswith("hf:"):
            data_file(source)


def chat_source(cfg, name: str, given: str) -> str | None:
    """The data of a --sft_data style flag: `given`, or '' = <data_dir>/<name>, or 'none' = none."""
    if given == "none":
        return None
    return given or str(data_path(cfg.data_dir, name))


class SFTTrainer(Trainer):
    """Supervised fine-tuning: the loss counts only the assistant tokens of each chat (dataset.shift_chat).

    Changes only the data (chats, padded or packed) and the masked loss; evaluation adds the answer accuracy
    of greedy replies to held-out questions (evals.answer_accuracy).
    """

    stage = "sft"
    init_stages = ("pretrain",)  # `init_from` defaults to checkpoint/<the first of these that exists>

    def build_model(self) -> tuple[GPT, Tokenizer]:
        if self.cfg.resume:
            self.init_source = load_run_info(self.out_dir)["init_from"]
            return self.load_pretrained(self.out_dir)
        self.init_source = str(self.start_dir(self.init_stages))
        return self.load_pretrained(self.init_source)

    def build_data(self):
        self.build_chat_data()
        self.sampler = self.train_data.sampler(self.cfg.seed, self.rank, self.world)

    def build_chat_data(self):
        """train_data and val_data (None with --sft_val_data none) from the chat options, and answer_chats."""
        cfg = self.cfg
        if (cfg.reasoning or cfg.think_weight != 1) and not self.tokenizer.think_ids:
            raise ValueError(f"the tokenizer of {self.init_source or cfg.data_dir} has no <think> and </think> "
                             f"tokens (it predates the reasoning format): prepare the data again "
                             f"(python prepare.py) and pretrain on it")
        train_source = chat_source(cfg, cfg.chat_file("train"), cfg.sft_data)
        if train_source is None:
            raise ValueError("--sft_data none: there must be training chats")
        if cfg.reasoning and not cfg.sft_data and not Path(train_source).exists():
            raise FileNotFoundError(f"{train_source}: missing (prepare.py writes the reasoning chats of StoryWorld: "
                                    f"run it again on data prepared before them), or give --sft_data")
        val_source = chat_source(cfg, cfg.chat_file("val"), cfg.sft_val_data)
        check_files(train_source, val_source)
        options = {**cfg.read_options(), "think_weight": cfg.think_weight}
        with self.rank_zero_first():  # rank 0 tokenises into the cache, the others then read it
            self.train_data = SFTDataset(train_source, self.tokenizer, self.seq_len, cfg.drop_long, **options)
        self.log(f"{train_source}: {self.train_data.summary()}")
        self.val_data = None
        if val_source:
            with self.rank_zero_first():
                self.val_data = SFTDataset(val_source, self.tokenizer, self.seq_len, **options)
        self.answer_chats = load_answer_chats(cfg, cfg.sft_val_data, self.log, cfg.chat_file("val"))

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.cfg.pack:
            return self.to_device(self.train_data.packed_batch(self.sampler, self.cfg.batch_size))
        return self.to_device(self.train_data.batch(self.sampler.next(self.cfg.batch_size)))

    def rows_per_epoch(self) -> int:
        if self.cfg.pack:  # rows of seq_len tokens (a little fewer than the packed rows of an epoch)
            return math.ceil(self.train_data.n_tokens / self.seq_len)
        return len(self.train_data)

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"], segment_ids=batch.get("segment_ids"))
        return lm_loss(logits, batch["labels"], batch["loss_mask"]), {}

    @classmethod
    def show_mask(cls, cfg: SFTConfig) -> str:
        """The first training chat as the trainer sees it, the trained-on tokens between ⟦ ⟧ (--show_mask)."""
        source = chat_source(cfg, cfg.chat_file("train"), cfg.sft_data)
        if source is None:
            raise ValueError("--sft_data none: there is no training chat to show")
        try:  # the tokenizer of the checkpoint to fine-tune, else (before pretraining) the data's
            tokenizer = Tokenizer.from_pretrained(find_init_dir(cfg.init_from, cls.init_stages))
        except FileNotFoundError:
            tokenizer = Tokenizer.from_pretrained(data_path(cfg.data_dir))
        if needs_chatml(tokenizer):  # a base model: training gives it ChatML (load_pretrained)
            tokenizer = tokenizer.with_chatml()
        chats, _ = load_chats(source, cfg.skip_bad_rows, cfg.hf_data_files, cfg.hf_split, limit=1)
        if not chats:
            raise ValueError(f"{source}: no chats")
        ids, mask = tokenizer.apply_chat_template(chats[0], return_assistant_mask=True)
        input_ids, labels, mask = shift_chat(ids, mask, cfg.seq_len or len(ids))
        weights = token_weights(labels, mask, tokenizer.think_ids, cfg.think_weight)
        return (f"{source}, first chat: {len(ids)} tokens, {int(mask.sum())} trained on (between ⟦ ⟧):\n\n"
                + format_mask(tokenizer, input_ids, labels, weights))



class LoRAMixin:
    """LoRA for a Trainer stage: adapters on a frozen base, from the lora_* options (configs.LoRAOptions), and
    adapter-only checkpoints (lora.py), whenever `uses_lora` (always for train_lora.py, with --lora for DPO)."""

    @property
    def uses_lora(self) -> bool:
        return True

    def build_lora_model(self, base_dir) -> tuple[GPT, Tokenizer]:
        """Fresh adapters on base_dir, its linear layers quantised with --quantize (QLoRA; the output head stays
        as it is); when resuming, out_dir's adapters on their own base with their own settings and quantisation,
        whatever the flags say now (another --quantize is refused). The base becomes init_source."""
        cfg = self.cfg
        if cfg.resume:
            config = lora.read_adapter_config(self.out_dir)
            base_dir = lora.check_base(config, self.out_dir)
            recorded = config.get("quantization")
            trained_on = recorded["scheme"] if recorded else "float"
            if cfg.quantize and cfg.quantize != trained_on:
                raise ValueError(f"{self.out_dir / lora.ADAPTER_CONFIG}: the adapters were trained on a {trained_on} "
                                 f"base; --resume cannot continue them on a {cfg.quantize} one (leave --quantize out)")
        else:
            config = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                      "use_rslora": cfg.use_rslora,
                      "targets": [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]}
        self.init_source = str(base_dir)
        self.lora_settings = {k: config[k] for k in ("r", "alpha", "dropout", "use_rslora", "targets")}
        model, tokenizer = self.load_pretrained(self.init_source)
        if not cfg.resume:  # QLoRA: the output head stays as it is, as in bitsandbytes' and peft's QLoRA
            quant.quantize_as(model, cfg.quantize, self.init_source, head=False)
        elif recorded and quant.quantization_of(model) is None:  # else the base was saved quantised, and loaded so
            quant.quantize_model(model, **recorded)
        if quant.quantization_of(model):
            self.log(f"the frozen base is held in {quant.quantization_of(model)['scheme']}: "
                     f"{quant.linear_weight_bytes(model) / 1e6:.1f} MB of linear weights")
        counts = lora.apply_lora(model, **self.lora_settings)
        if cfg.resume:
            lora.load_adapters(model, self.out_dir)
        self.log(f"LoRA r={config['r']} on {counts['wrapped']} layers: {counts['trainable']:,} trainable of "
                 f"{counts['total']:,} parameters ({100 * counts['trainable'] / counts['total']:.2f}%)")
        return model, tokenizer

    def write_checkpoint(self, directory, run_info: dict, train_state: dict | None = None):
        if not self.uses_lora:
            return super().write_checkpoint(directory, run_info, train_state)
        lora.save_lora_checkpoint(directory, self.model, self.tokenizer, self.init_source, self.lora_settings,
                                  run_info, train_state)


class LoRATrainer(LoRAMixin, SFTTrainer):
    """SFT through LoRA adapters on a frozen model; checkpoints hold only the adapters (lora.py)."""

    stage = "lora"
    init_stages = ("sft", "pretrain")

    def build_model(self) -> tuple[GPT, Tokenizer]:
        return self.build_lora_model(None if self.cfg.resume else self.start_dir(self.init_stages))


class PolicyTrainer(LoRAMixin, Trainer):
    """A stage that aligns a chat policy, starting from a checkpoint (the SFT model by default) and held near it:
    DPO here, the reward model, GRPO and PPO in rl.py.

    The reference is the starting checkpoint, frozen: its own copy, or with --lora the same network with the
    adapters off (one copy of the weights). run.json records it, so --resume rebuilds the same reference.
    """

    init_stages = ("sft",)

    @property
    def uses_lora(self) -> bool:
        return self.cfg.lora

    def build_policy(self, needs_reference: bool) -> tuple[GPT, Tokenizer]:
        """The policy, the checkpoint to align (or out_dir's when resuming), and self.reference: a frozen copy of
        the starting model if needs_reference (else None; also None with --lora, whose reference is the adapters
        switched off)."""
        cfg = self.cfg
        self.reference = None
        if self.uses_lora:
            start = None if cfg.resume else str(self.start_dir(self.init_stages))
            if start and lora.is_adapter_dir(start):
                raise ValueError(f"{start} holds LoRA adapters, and --lora needs a full checkpoint as its base: "
                                 f"fold them in first (python train_lora.py --out_dir {start} --export_merged DIR) "
                                 f"and pass --init_from DIR")
            return self.build_lora_model(start)  # sets init_source to the base
        if cfg.resume:
            self.init_source = load_run_info(self.out_dir).get("init_from") or cfg.init_from
            model, tokenizer = self.load_pretrained(self.out_dir)
            if needs_reference:
                self.reference = self.load_start(self.init_source)[0].requires_grad_(False)
            return model, tokenizer
        self.init_source = str(self.start_dir(self.init_stages))
        model, tokenizer = self.load_start(self.init_source)
        if needs_reference:  # training needs a copy that stays put
            self.reference = copy.deepcopy(model).requires_grad_(False)
        return model, tokenizer

    def load_start(self, directory) -> tuple[GPT, Tokenizer]:
        """A full checkpoint, or an adapter checkpoint (checkpoint/lora) with its adapters folded into its base."""
        if not lora.is_adapter_dir(directory):
            return self.load_pretrained(directory)
        model, tokenizer = lora.load_merged(directory)
        if self.model_overrides:  # e.g. --dropout: rebuild with the overrides, keep the merged weights
            merged = model.state_dict()
            model = GPT(dataclasses.replace(model.config, **self.model_overrides))
            model.load_state_dict(merged)
        base = lora.read_adapter_config(directory)["base_checkpoint"]
        self.log(f"{directory}: LoRA adapters, folded into their base {base}")
        return model, tokenizer

    def build_pair_data(self, max_tokens: int):
        """train_data and val_data from the preference pairs of --train_file and --val_file, each sequence (prompt
        and reply) cut to max_tokens, and the sampler of the training pairs."""
        cfg = self.cfg
        sources = {split: chat_source(cfg, f"dpo_{split}.jsonl", given)
                   for split, given in (("train", cfg.train_file), ("val", cfg.val_file))}
        check_files(*sources.values())
        data = {}
        for split, source in sources.items():
            with self.rank_zero_first():  # rank 0 tokenises into the cache, the others then read it
                data[split] = PreferenceDataset(source, self.tokenizer, max_tokens, **cfg.read_options())
            self.log(f"{source}: {len(data[split])} pairs, {data[split].n_truncated} truncated to {max_tokens} "
                     f"tokens, {data[split].n_skipped} malformed rows skipped")
        self.train_data, self.val_data = data["train"], data["val"]
        self.sampler = self.train_data.sampler(cfg.seed, self.rank, self.world)

    @contextmanager
    def reference_model(self):
        """The frozen reference: its own copy, or with --lora this network with the adapters off, in eval mode
        (as the copy is) so that no dropout applies."""
        if not self.uses_lora:
            yield self.reference
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with lora.adapters_disabled(self.model):
                yield self.model
        finally:
            self.model.train(was_training)


class DPOTrainer(PolicyTrainer):
    """Direct preference optimisation against a frozen reference: a copy of the starting policy.

    Each step runs the chosen and rejected sequences through the policy as one batch and through the reference
    without gradients (or reads the reference log-probabilities computed once before training, with
    --precompute_ref, when the reference model is freed). With --lora the policy is the starting model with
    adapters and the reference is the same network with the adapters off: one copy of the weights.
    Evaluation adds the answer accuracy on held-out chats, to show whether DPO kept what SFT taught.
    """

    stage = "dpo"

    def __init__(self, cfg, model_overrides: dict | None = None):
        self.loss_fn = DPOLoss(cfg.beta, cfg.loss_type, cfg.label_smoothing)  # bad settings fail before any loading
        super().__init__(cfg, model_overrides)

    def build_model(self) -> tuple[GPT, Tokenizer]:
        # --precompute_ref reads the untrained policy itself once (a resumed run, its starting checkpoint).
        precompute_from_policy = self.cfg.precompute_ref and not self.cfg.resume
        model, tokenizer = self.build_policy(needs_reference=not precompute_from_policy)
        if precompute_from_policy and not self.uses_lora:
            self.reference = model
        elif self.reference is not None and self.cfg.reference_quant:
            # The reference's linear layers held quantised: an untied output head too; a tied one stays shared with
            # the embedding.
            quant.quantize_model(self.reference, self.cfg.reference_quant, head=not model.config.tie_embeddings)
            self.log(f"the reference is held in {self.cfg.reference_quant}: "
                     f"{quant.linear_weight_bytes(self.reference) / 1e6:.1f} MB of linear weights")
        return model, tokenizer

    def build_data(self):
        """The pairs, and the reference on the device (precomputing its log-probabilities if asked)."""
        cfg = self.cfg
        check_files(chat_source(cfg, "sft_val.jsonl", cfg.eval_chats) if cfg.eval_samples else None)  # before pairs
        self.build_pair_data(self.seq_len)
        self.answer_chats = load_answer_chats(cfg, cfg.eval_chats, self.log)
        if self.reference is not None:
            self.reference.to(self.device).eval()
        if cfg.precompute_ref:
            for dataset in (self.train_data, self.val_data):
                dataset.reference_logps = self._reference_logps_of(dataset)
            self.reference = None  # freed (or it was the policy): training holds one model, as in SFT

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.to_device(self.train_data.batch(self.sampler.next(self.cfg.batch_size)))

    @torch.no_grad()
    def _reference_logps_of(self, dataset) -> torch.Tensor:
        """(N, 2) reference log-probabilities of every pair's chosen and rejected reply."""
        out = []
        for start in tqdm(range(0, len(dataset), self.cfg.batch_size), desc="reference log-probs",
                          disable=not self.master, file=sys.stdout, leave=False):
            indices = range(start, min(start + self.cfg.batch_size, len(dataset)))
            batch = self.to_device(dataset.batch(indices))
            with self.autocast():
                out.append(self._reference_logps(batch).float().cpu().view(2, -1).T)
        return torch.cat(out)

    def _reference_logps(self, batch) -> torch.Tensor:
        """The reference's log-probabilities of a batch, in the caller's autocast region (compute_loss's)."""
        with torch.no_grad(), self.reference_model() as reference:
            return sequence_logps(reference(batch["input_ids"]), batch["labels"], batch["loss_mask"])

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = sequence_logps(model(batch["input_ids"]), batch["labels"], batch["loss_mask"])
        reference = batch["reference_logps"] if "reference_logps" in batch else self._reference_logps(batch)
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_lengths, rejected_lengths = batch["loss_mask"].sum(-1).chunk(2)
        loss, chosen_rewards, rejected_rewards = self.loss_fn(chosen_logps, rejected_logps, *reference.chunk(2),
                                                              chosen_lengths, rejected_lengths)
        return loss, {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                      "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
                      "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
                      "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}


class DistillTrainer(SFTTrainer):
    """Knowledge distillation: a student learns from a frozen teacher's next-token distributions as well as from the
    labels, on chats (the assistant tokens, as in SFT) or on pretraining text (every token of fixed windows).

    loss = alpha * CE(labels) + (1 - alpha) * T² * D(teacher, student), with D the generalised JSD at temperature T
    (loss.generalized_jsd) over the trained tokens. The teacher runs at every step without gradients, in the
    student's precision; or, with --teacher_topk K, once over all the data into a store on disk (teachercache.py),
    after which it is freed. The student is a fresh model of the preset or --init_from; it must have the teacher's
    tokenizer, as D compares the two distributions token id by token id.
    """

    stage = "distill"
    init_stages = ("sft",)  # --show_mask: the tokenizer of the latest checkpoint/sft, the default teacher

    def build_model(self) -> tuple[GPT, Tokenizer]:
        """The student, and the teacher (frozen, on the device): when resuming, the student of out_dir and the
        teacher that run.json names, whatever the flags say now."""
        cfg = self.cfg
        info = load_run_info(self.out_dir) if cfg.resume else {"init_from": cfg.init_from}
        self.teacher_dir = info.get("teacher") or str(find_init_dir(cfg.teacher, ("sft",)))
        self.teacher, tokenizer = lora.load_merged(self.teacher_dir)
        self.teacher.to(self.device).eval().requires_grad_(False)
        self.log(f"teacher {self.teacher_dir} ({self.teacher.describe_size()})")
        self.init_source = info["init_from"]
        student_dir = self.out_dir if cfg.resume else cfg.init_from
        if not student_dir:
            return self.new_model(tokenizer), tokenizer
        student, student_tokenizer = self.load_pretrained(student_dir)
        self.check_tokenizer(student_tokenizer, tokenizer, f"the student {student_dir}")
        return student, tokenizer

    def check_tokenizer(self, tokenizer: Tokenizer, teacher_tokenizer: Tokenizer, whose: str):
        if tokenizer.fingerprint() != teacher_tokenizer.fingerprint():
            raise ValueError(f"{whose} has another tokenizer than the teacher {self.teacher_dir}: distillation "
                             f"compares their next-token distributions token id by token id, so they must share one")

    def build_data(self):
        """Chats or text windows, and with --teacher_topk the teacher's stores of both splits (then the teacher
        is freed)."""
        cfg = self.cfg
        if self.seq_len > self.teacher.config.max_seq_len:
            raise ValueError(f"--seq_len {self.seq_len} is longer than the teacher's context (max_seq_len "
                             f"{self.teacher.config.max_seq_len})")
        if cfg.data == "chats":
            self.build_chat_data()
        else:
            data_dir = data_path(cfg.data_dir)
            self.check_tokenizer(Tokenizer.from_pretrained(data_dir), self.tokenizer, f"the data {data_dir}")
            self.train_data, self.val_data = (TextWindows(data_dir, split, self.seq_len) for split in ("train", "val"))
            self.log(f"{data_dir}: {len(self.train_data)} train and {len(self.val_data)} val windows of "
                     f"{self.seq_len} tokens")
        self.sampler = self.train_data.sampler(cfg.seed, self.rank, self.world)
        self.stored: dict[str, TeacherTopK] = {}
        if cfg.teacher_topk:
            for split, data in (("train", self.train_data), ("val", self.val_data)):
                if data is not None:
                    self.stored[split] = self.teacher_store(data)
            self.teacher = None  # all it has to say is on disk now

    def teacher_store(self, data) -> TeacherTopK:
        """The teacher's top-K store of `data`, written first if there is none yet (by rank 0)."""
        cfg = self.cfg
        directory = store_dir(data, self.teacher, cfg.teacher_topk, cfg.temperature, self.dtype)
        with self.rank_zero_first():
            if not is_complete(directory):
                write_store(directory, data, self.teacher_logits, cfg.teacher_topk, cfg.temperature,
                            self.tokenizer.vocab_size, cfg.batch_size, self.log)
        return TeacherTopK(directory)

    @torch.no_grad()
    def teacher_logits(self, batch) -> torch.Tensor:
        batch = self.to_device(batch)
        with self.autocast():
            return self.teacher(batch["input_ids"], segment_ids=batch.get("segment_ids"))

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.cfg.pack:  # (never with --teacher_topk)
            return super().next_batch()
        return self.batch_of("train", self.sampler.next(self.cfg.batch_size))

    def eval_batches(self, split: str):
        data = {"train": self.train_data, "val": self.val_data}[split]
        if data is not None:
            for indices in data.eval_indices(self.cfg.batch_size, self.cfg.eval_iters):
                yield self.batch_of(split, indices)

    def batch_of(self, split: str, indices) -> dict[str, torch.Tensor]:
        """Rows `indices` of a split, with the teacher's stored top K if there is a store."""
        batch = {"train": self.train_data, "val": self.val_data}[split].batch(indices)
        if split in self.stored:
            batch.update(self.stored[split].batch(indices, batch["loss_mask"]))
        return self.to_device(batch)

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, vocab = self.cfg, self.tokenizer.vocab_size
        logits = model(batch["input_ids"], segment_ids=batch.get("segment_ids"))[..., :vocab]
        mask = batch["loss_mask"]
        ce = lm_loss(logits, batch["labels"], mask)
        trained = mask != 0  # the divergence at these positions only (a chat's few): its softmaxes are not cheap
        if "teacher_ids" in batch:
            divergence = topk_jsd(logits[trained], batch["teacher_ids"][trained], batch["teacher_logps"][trained],
                                  mask[trained], cfg.beta, cfg.temperature)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(batch["input_ids"], segment_ids=batch.get("segment_ids"))[..., :vocab]
            divergence = generalized_jsd(logits[trained], teacher_logits[trained], mask[trained], cfg.beta,
                                         cfg.temperature)
        loss = cfg.alpha * ce + (1 - cfg.alpha) * cfg.temperature ** 2 * divergence
        return loss, {"ce": ce.detach(), "divergence": divergence.detach()}

    def run_info(self) -> dict:
        return {**super().run_info(), "teacher": self.teacher_dir}
