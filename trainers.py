"""One training loop for every stage.

`Trainer` owns the loop: device and precision, DDP, gradient accumulation and clipping, the learning-rate
schedule, evaluation, logging and checkpoints. A stage subclasses it and overrides only what differs:
  build_model()   which weights to start from
  build_data()    its datasets and samplers
  next_batch()    the next training micro-batch (a dict of tensors)
  compute_loss()  the loss of one micro-batch, plus metrics to log
  evaluate()      validation metrics
Read `Trainer.train` top to bottom for the whole loop.
"""

import copy
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import lora
from checkpoint import (
    latest_checkpoint,
    load_model_config,
    load_run_info,
    load_train_state,
    load_weights,
    save_checkpoint,
)
from configs import ModelConfig, TrainConfig, get_config, parse_train_args
from dataset import PreferenceDataset, PretrainDataset, SFTDataset, load_chats
from evals import answer_accuracy
from flops import mfu
from loss import DPOLoss, lm_loss, sequence_logps
from model import GPT
from moe import collect_moe_stats
from prepare import ensure_default_data
from tokenizer import Tokenizer


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, else fp16 (with a grad scaler); float32 on CPU and MPS.

    CPUs without bf16 instructions run bf16 autocast ~40x slower, and MPS has produced NaNs in half
    precision, so those stay in float32 unless asked.
    """
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_compile(setting: str, device: torch.device) -> bool:
    """'auto' compiles on CUDA under Linux, where torch.compile is mature; 'true' and 'false' force it."""
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"--compile must be auto, true or false, got {setting!r}")
    return setting == "true" or (setting == "auto" and device.type == "cuda" and platform.system() == "Linux")


def prepare_default_data(data_dir: str) -> None:
    """Generate the embedded default data set on first use (other data directories come from prepare.py)."""
    if data_dir == "data/storyworld":
        ensure_default_data(data_dir)


class Trainer:
    stage = "pretrain"

    def __init__(self, cfg: TrainConfig, model_overrides: dict | None = None):
        self.cfg = cfg
        self.model_overrides = model_overrides or {}
        self._setup_distributed()
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                         if self.dtype != torch.float32 else nullcontext())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.out_dir = Path(cfg.out_dir or f"checkpoint/{self.stage}")
        torch.manual_seed(cfg.seed + self.rank)
        self.step = self.tokens_seen = 0
        self.started = time.time()

        self.model, self.tokenizer = self.build_model()
        self.model.to(self.device)
        self.model.grad_checkpoint = cfg.grad_checkpoint
        self.seq_len = cfg.seq_len or self.model.config.max_seq_len
        self.build_data()
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                                         self.device.type)
        if cfg.resume:
            self.load_state()
        self.train_model = self._wrap(self.model)
        self.wandb = self._init_wandb() if cfg.wandb and self.master else None

    # ------------------------------------------------------------------ set-up
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

    def _wrap(self, model, compile_it: bool | None = None):
        """torch.compile (where it works) and DDP around the model the loop trains."""
        if compile_it is None:
            compile_it = pick_compile(self.cfg.compile, self.device)
        self.compiled = compile_it
        if compile_it:
            model = torch.compile(model)
        if self.ddp:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def _init_wandb(self):
        import wandb

        return wandb.init(project=self.cfg.wandb_project, name=f"{self.stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                          config={"train": asdict(self.cfg), "model": asdict(self.model.config)},
                          dir=str(self.out_dir.parent))

    def log(self, message: str):
        if self.master:
            tqdm.write(message)

    # ------------------------------------------------------------------ stage hooks
    def build_model(self) -> tuple[GPT, Tokenizer]:
        """Pretraining: a fresh model of the preset, shaped for the data's tokenizer (or the checkpoint
        in init_from / out_dir when resuming)."""
        source = self.out_dir if self.cfg.resume else self.cfg.init_from
        if source:
            return self.load_pretrained(source)
        prepare_default_data(self.cfg.data_dir)
        tokenizer = Tokenizer.from_pretrained(self.cfg.data_dir)
        preset = self.cfg.preset
        if preset == "auto":
            preset = "tiny" if self.device.type == "cpu" else "minimind2-small"
        config = get_config(preset, **{"vocab_size": tokenizer.vocab_size, **self.model_overrides})
        if config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model vocab_size {config.vocab_size} < tokenizer's {tokenizer.vocab_size}")
        model = GPT(config)
        self.log(f"new {preset} model ({model.describe_size()})")
        return model, tokenizer

    def load_pretrained(self, directory) -> tuple[GPT, Tokenizer]:
        """Model (with any model-field overrides such as dropout) and tokenizer of a checkpoint."""
        config = load_model_config(directory)
        config = ModelConfig(**{**asdict(config), **self.model_overrides})
        model = GPT(config)
        load_weights(model, directory)
        self.log(f"loaded {directory} ({model.describe_size()})")
        return model, Tokenizer.from_pretrained(directory)

    def build_data(self):
        self.train_data = PretrainDataset(self.cfg.data_dir, "train", self.seq_len)
        self.val_data = PretrainDataset(self.cfg.data_dir, "val", self.seq_len)
        self.sampler = self.train_data.sampler(self.cfg.batch_size, self.cfg.seed, self.rank, self.world)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.to_device(self.train_data.batch(self.sampler.next()))

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = lm_loss(model(batch["input_ids"]), batch["labels"])
        return loss, {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the same eval_iters validation batches each time (so evaluations compare)."""
        sampler = self.val_data.sampler(self.cfg.batch_size, seed=0, rank=self.rank, world=self.world)
        losses = []
        for _ in range(self.cfg.eval_iters):
            batch = self.to_device(self.val_data.batch(sampler.next()))
            with self.autocast:
                losses.append(self.compute_loss(self.model, batch)[0].float())
        return {"val_loss": self.all_reduce_mean(torch.stack(losses).mean())}

    # ------------------------------------------------------------------ helpers for the stages
    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

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

    def tokens_in(self, batch) -> int:
        return batch["input_ids"].numel()

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        cfg, model = self.cfg, self.train_model
        tokens_per_step = 0
        compile_unproven = self.compiled  # until the first compiled step has run
        t_log, tokens_since_log = time.time(), 0
        last_eval: dict[str, float] = {}
        bad_steps = 0
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.master, desc=self.stage,
                   dynamic_ncols=True, file=sys.stdout)
        try:
            while self.step < cfg.max_steps:
                if self.step % cfg.eval_interval == 0:
                    last_eval = self.run_eval()
                lr = self.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr

                model.train()
                tokens_per_step = 0
                loss_finite = torch.ones((), dtype=torch.bool, device=self.device)
                for micro in range(cfg.grad_accum):
                    batch = self.next_batch()
                    tokens_per_step += self.tokens_in(batch)
                    # Under DDP, gradients are all-reduced only on the last micro-batch.
                    sync = micro == cfg.grad_accum - 1
                    try:
                        loss, metrics = self.forward_backward(model, batch, sync)
                    except Exception as e:
                        # torch.compile fails lazily, on the first call (no C++ compiler, MPS, Windows,
                        # an old torch): fall back to eager once, with a message, rather than crash.
                        if not compile_unproven:
                            raise
                        reason = (str(e).strip().splitlines() or [""])[0][:200]
                        self.log(f"torch.compile failed ({type(e).__name__}: {reason}); training in eager mode")
                        self.optimizer.zero_grad(set_to_none=True)
                        model = self.train_model = self._wrap(self.model, compile_it=False)
                        loss, metrics = self.forward_backward(model, batch, sync)
                    compile_unproven = False
                    loss_finite &= torch.isfinite(loss.detach())

                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                           cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                # One scalar read per step: a NaN/inf loss or gradient must not reach the weights.
                if not (torch.isfinite(grad_norm) & loss_finite).item():
                    bad_steps += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.update()
                    self.log(f"step {self.step}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
                    if bad_steps >= 10:
                        raise RuntimeError(f"{bad_steps} non-finite steps in a row at step {self.step}; stopping. "
                                           f"The last good checkpoint in {self.out_dir} is kept; try a lower --lr")
                    continue
                bad_steps = 0
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                bar.update(1)
                tokens_since_log += tokens_per_step * self.world
                self.tokens_seen += tokens_per_step * self.world

                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
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
                if self.step % cfg.save_interval == 0 and self.step < cfg.max_steps:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            self.log(f"interrupted at step {self.step}: saving so that --resume continues from here")
            self.save()
            raise
        bar.close()
        last_eval = self.run_eval()
        self.save()
        return last_eval

    def forward_backward(self, model, batch, sync: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and backward of one micro-batch; under DDP, gradients are all-reduced only when sync."""
        with model.no_sync() if self.ddp and not sync else nullcontext():
            with self.autocast, collect_moe_stats(self.model) as moe:
                loss, metrics = self.compute_loss(model, batch)
            if moe.aux_losses:  # MoE models: the load-balancing loss, in every stage
                loss = loss + self.model.config.aux_loss_alpha * moe.aux_loss()
                metrics = {**metrics, **moe.metrics()}
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
        return loss, metrics

    def run_eval(self) -> dict[str, float]:
        self.model.eval()
        results = self.evaluate()
        self.write_metrics("val", results)
        self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results

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
        return {"stage": self.stage, "step": self.step, "init_from": self.cfg.init_from,
                "train_config": asdict(self.cfg), "argv": sys.argv, "tokens_seen": self.tokens_seen,
                "wall_time_s": time.time() - self.started, "peak_memory": peak_memory()}

    def train_state(self) -> dict:
        """Everything besides the weights that --resume needs to continue exactly."""
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(), "tokens_seen": self.tokens_seen,
                "wall_time_s": time.time() - self.started, **self._rng_state()}

    def save(self):
        """Write the checkpoint (rank 0 only; the others wait so no rank runs ahead of a save)."""
        rank_rng = None
        if self.ddp:  # each rank's RNG (its own dropout stream), so every rank resumes exactly
            rank_rng = [None] * self.world
            dist.all_gather_object(rank_rng, self._rng_state())
        if self.master:
            state = self.train_state()
            if rank_rng is not None:
                state["rank_rng"] = rank_rng
            self.write_checkpoint(state)
        if self.ddp:
            dist.barrier()

    def write_checkpoint(self, train_state: dict):
        """Write out_dir (on rank 0): the full model; a LoRA stage writes only its adapters."""
        save_checkpoint(self.out_dir, self.model, self.tokenizer, self.run_info(), train_state)

    def _rng_state(self) -> dict:
        state = {"cpu_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict):
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def load_state(self):
        """Restore optimizer, scaler, RNG and data position from out_dir (the weights came in build_model)."""
        state = load_train_state(self.out_dir)
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rank_rng = state.get("rank_rng")
        self._set_rng_state(rank_rng[self.rank] if rank_rng and len(rank_rng) == self.world else state)
        self.sampler.load_state_dict(state["sampler"])
        self.tokens_seen = state.get("tokens_seen", 0)
        self.started -= state.get("wall_time_s", 0.0)  # wall time counts the interrupted run too
        info = load_run_info(self.out_dir)
        self.log(f"resuming {info.get('stage', self.stage)} from step {self.step} in {self.out_dir}")

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.ddp:
            dist.destroy_process_group()


class PretrainTrainer(Trainer):
    """Pretraining: next-token prediction on random windows of the token files (all in the base class)."""

    stage = "pretrain"


def peak_memory() -> str:
    """This process's peak resident memory (Linux's VmHWM) and, if CUDA was used, the peak GPU memory allocated."""
    parts = []
    status = Path("/proc/self/status")
    if status.exists():
        kb = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        parts.append(f"peak RSS {kb / 1024:.0f} MiB")
    if torch.cuda.is_initialized():
        parts.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return ", ".join(parts) or "peak memory: not measured on this platform"


def run_stage(trainer_cls, config_cls=TrainConfig, argv=None, description: str = "") -> dict[str, float]:
    """Entry point shared by the train_*.py scripts: parse flags, train, report, clean up.

    Bad input (a missing file, a config that does not fit) ends with one line, not a traceback.
    """
    cfg, model_overrides = parse_train_args(config_cls, argv, description)
    try:
        trainer = trainer_cls(cfg, model_overrides)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    try:
        results = trainer.train()
        trainer.log(f"saved {trainer.out_dir} at step {trainer.step}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        trainer.log(peak_memory())
        if trainer.master:
            from plots import write_curves  # matplotlib is slow to import: only once the run is done

            trainer.log(write_curves(trainer.out_dir))
        return results
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    finally:
        trainer.close()


def find_init_dir(init_from: str, stages: tuple[str, ...]) -> Path:
    """The checkpoint to fine-tune: init_from if given, else checkpoint/<stage> for the first of `stages`
    that has one (e.g. the SFT model if there is one, else the pretrained one)."""
    if init_from:
        return Path(init_from)
    for stage in stages:
        found = latest_checkpoint("checkpoint", (stage,))
        if found is not None:
            return found
    raise FileNotFoundError(f"no {' or '.join(stages)} checkpoint under checkpoint/: run "
                            f"`python train_{stages[-1]}.py` first, or pass --init_from DIR")


def chat_source(cfg, name: str, given: str) -> str | None:
    """The chats of a --sft_data style flag: `given`, or '' = <data_dir>/<name>, or 'none' = none."""
    if given == "none":
        return None
    if given:
        return given
    prepare_default_data(cfg.data_dir)
    return str(Path(cfg.data_dir) / name)


class SFTTrainer(Trainer):
    """Supervised fine-tuning: the loss counts only the assistant tokens of each chat (dataset.shift_chat).

    Changes only the data (chats, padded or packed) and the masked loss; evaluation adds the answer accuracy
    of greedy replies to held-out questions (evals.answer_accuracy).
    """

    stage = "sft"
    init_stages = ("pretrain",)  # `init_from` defaults to checkpoint/<the first of these that exists>

    def build_model(self) -> tuple[GPT, Tokenizer]:
        if self.cfg.resume:
            self.base_dir = load_run_info(self.out_dir)["init_from"]
            return self.load_pretrained(self.out_dir)
        self.base_dir = str(find_init_dir(self.cfg.init_from, self.init_stages))
        return self.load_pretrained(self.base_dir)

    def load_chat_data(self, source: str) -> list[list[dict]]:
        cfg = self.cfg
        chats, skipped = load_chats(source, cfg.skip_bad_rows, cfg.hf_data_files, cfg.hf_split)
        if skipped:
            self.log(f"{source}: skipped {skipped} malformed rows (--skip_bad_rows)")
        return chats

    def build_data(self):
        cfg = self.cfg
        if self.seq_len > self.model.config.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} is longer than the model's max_seq_len "
                             f"{self.model.config.max_seq_len}")
        train_source = chat_source(cfg, "sft_train.jsonl", cfg.sft_data)
        if train_source is None:
            raise ValueError("--sft_data none: there must be training chats")
        self.train_data = SFTDataset(self.load_chat_data(train_source), self.tokenizer, self.seq_len, cfg.drop_long)
        self.log(f"{train_source}: {self.train_data.summary()}")
        self.sampler = self.train_data.sampler(cfg.seed, self.rank, self.world)
        val_source = chat_source(cfg, "sft_val.jsonl", cfg.sft_val_data)
        self.val_chats = self.load_chat_data(val_source) if val_source else []
        self.val_data = SFTDataset(self.val_chats, self.tokenizer, self.seq_len) if self.val_chats else None

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.cfg.pack:
            return self.to_device(self.train_data.packed_batch(self.sampler, self.cfg.batch_size))
        return self.to_device(self.train_data.padded_batch(self.sampler.next(self.cfg.batch_size)))

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"], segment_ids=batch.get("segment_ids"))
        return lm_loss(logits, batch["labels"], batch["loss_mask"]), {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Masked loss on the first eval_iters * batch_size val chats, and answer accuracy on eval_samples."""
        if self.val_data is None:
            return {}
        cfg, n = self.cfg, len(self.val_data)
        losses = []
        for start in range(0, min(n, cfg.eval_iters * cfg.batch_size), cfg.batch_size):
            batch = self.to_device(self.val_data.padded_batch(list(range(start, min(n, start + cfg.batch_size)))))
            with self.autocast:
                losses.append(self.compute_loss(self.model, batch)[0].float())
        results = {"val_loss": self.all_reduce_mean(torch.stack(losses).mean())}
        if cfg.eval_samples > 0:  # the same on every rank: no reduction needed
            with self.autocast:
                results.update(answer_accuracy(self.model, self.tokenizer, self.val_chats[:cfg.eval_samples],
                                               cfg.max_new_tokens))
        return results

    def run_info(self) -> dict:
        return {**super().run_info(), "init_from": self.base_dir}


class LoRAMixin:
    """LoRA for a Trainer stage: adapters on a frozen base, from the lora_* options (configs.LoRAOptions), and
    adapter-only checkpoints (lora.py). A stage that can also train all weights leaves lora_settings None."""

    lora_settings: dict | None = None

    def build_lora_model(self, base_dir) -> tuple[GPT, Tokenizer]:
        """Fresh adapters on base_dir; when resuming, out_dir's adapters on their own base with their own
        settings, whatever the flags say now. Sets self.base_dir."""
        cfg = self.cfg
        if cfg.resume:
            config = lora.read_adapter_config(self.out_dir)
            base_dir = lora.check_base(config, self.out_dir)
        else:
            config = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                      "use_rslora": cfg.use_rslora,
                      "targets": [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]}
        self.base_dir = str(base_dir)
        self.lora_settings = {k: config[k] for k in ("r", "alpha", "dropout", "use_rslora", "targets")}
        model, tokenizer = self.load_pretrained(self.base_dir)
        counts = lora.apply_lora(model, **self.lora_settings)
        if cfg.resume:
            lora.load_adapters(model, self.out_dir)
        self.log(f"LoRA r={config['r']} on {counts['wrapped']} layers: {counts['trainable']:,} trainable of "
                 f"{counts['total']:,} parameters ({100 * counts['trainable'] / counts['total']:.2f}%)")
        return model, tokenizer

    def write_checkpoint(self, train_state: dict):
        if self.lora_settings is None:
            return super().write_checkpoint(train_state)
        lora.save_lora_checkpoint(self.out_dir, self.model, self.tokenizer, self.base_dir, self.lora_settings,
                                  self.run_info(), train_state)


class LoRATrainer(LoRAMixin, SFTTrainer):
    """SFT through LoRA adapters on a frozen model; checkpoints hold only the adapters (lora.py)."""

    stage = "lora"
    init_stages = ("sft", "pretrain")

    def build_model(self) -> tuple[GPT, Tokenizer]:
        return self.build_lora_model(None if self.cfg.resume else find_init_dir(self.cfg.init_from, self.init_stages))


class DPOTrainer(LoRAMixin, Trainer):
    """Direct preference optimisation against a frozen reference: a copy of the starting policy.

    Each step runs the chosen and rejected sequences through the policy as one batch and through the reference
    without gradients (or reads the reference log-probabilities computed once before training, with
    --precompute_ref, when the reference model is freed). With --lora the policy is the starting model with
    adapters and the reference is the same network with the adapters switched off: one copy of the weights.
    Evaluation adds the answer accuracy on held-out chats, to show whether DPO kept what SFT taught.
    """

    stage = "dpo"

    def build_model(self) -> tuple[GPT, Tokenizer]:
        """The policy: the checkpoint to align (or out_dir's when resuming). The reference is always the
        starting checkpoint, which run.json records so that --resume rebuilds the same reference."""
        if self.cfg.lora:
            start = None if self.cfg.resume else str(find_init_dir(self.cfg.init_from, ("sft",)))
            if start and lora.is_adapter_dir(start):
                raise ValueError(f"{start} holds LoRA adapters, and --lora needs a full checkpoint as its base: "
                                 f"fold them in first (python train_lora.py --out_dir {start} --export_merged DIR) "
                                 f"and pass --init_from DIR")
            model, tokenizer = self.build_lora_model(start)
            self.init_source, self.reference = self.base_dir, None  # the reference: adapters off
        elif self.cfg.resume:
            self.init_source = load_run_info(self.out_dir).get("init_from") or self.cfg.init_from
            model, tokenizer = self.load_pretrained(self.out_dir)
            self.reference = self.load_start(self.init_source)[0].requires_grad_(False)
        else:
            self.init_source = str(find_init_dir(self.cfg.init_from, ("sft",)))
            model, tokenizer = self.load_start(self.init_source)
            # Precomputing reads the untrained policy itself; otherwise training needs a copy that stays put.
            self.reference = model if self.cfg.precompute_ref else copy.deepcopy(model).requires_grad_(False)
        return model, tokenizer

    def load_start(self, directory) -> tuple[GPT, Tokenizer]:
        """A full checkpoint, or an adapter checkpoint (checkpoint/lora) with its adapters folded into its base."""
        if not lora.is_adapter_dir(directory):
            return self.load_pretrained(directory)
        model, tokenizer = lora.load_lora_checkpoint(directory)
        lora.merge_and_unload(model)
        if self.model_overrides:  # e.g. --dropout: rebuild with the overrides, keep the merged weights
            merged = model.state_dict()
            model = GPT(ModelConfig(**{**asdict(model.config), **self.model_overrides}))
            model.load_state_dict(merged)
        base = lora.read_adapter_config(directory)["base_checkpoint"]
        self.log(f"{directory}: LoRA adapters, folded into their base {base}")
        return model, tokenizer

    def build_data(self):
        """The pairs, and the reference on the device (precomputing its log-probabilities if asked)."""
        cfg = self.cfg
        self.loss_fn = DPOLoss(cfg.beta, cfg.loss_type, cfg.label_smoothing)
        if not (cfg.train_file and cfg.val_file):
            prepare_default_data(cfg.data_dir)
        files = {"train": cfg.train_file or f"{cfg.data_dir}/dpo_train.jsonl",
                 "val": cfg.val_file or f"{cfg.data_dir}/dpo_val.jsonl"}
        data = {}
        for split, path in files.items():
            data[split] = PreferenceDataset(path, self.tokenizer, self.seq_len, cfg.skip_bad_rows)
            self.log(f"{path}: {len(data[split])} pairs, {data[split].n_truncated} truncated to {self.seq_len} "
                     f"tokens, {data[split].n_skipped} malformed rows skipped")
        self.train_data, self.val_data = data["train"], data["val"]
        self.sampler = self.train_data.sampler(cfg.batch_size, cfg.seed, self.rank, self.world)
        self.answer_chats = []
        if cfg.eval_samples > 0:
            source = chat_source(cfg, "sft_val.jsonl", cfg.eval_chats)
            chats, skipped = load_chats(source, cfg.skip_bad_rows)
            self.answer_chats = chats[:cfg.eval_samples]
            self.log(f"{source}: answer accuracy on {len(self.answer_chats)} chats"
                     + (f", {skipped} malformed rows skipped" if skipped else ""))
        if self.reference is not None:
            self.reference.to(self.device).eval()
        if cfg.precompute_ref:
            for dataset in (self.train_data, self.val_data):
                dataset.reference_logps = self._reference_logps_of(dataset)
            self.reference = None  # freed (or it was the policy): training holds one model, as in SFT

    @contextmanager
    def reference_model(self):
        """The frozen reference: its own copy, or with --lora this network with the adapters off, in eval mode
        (as the copy is) so that no dropout applies."""
        if not self.cfg.lora:
            yield self.reference
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with lora.adapters_disabled(self.model):
                yield self.model
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _reference_logps_of(self, dataset) -> torch.Tensor:
        """(N, 2) reference log-probabilities of every pair's chosen and rejected reply."""
        out = []
        for start in tqdm(range(0, len(dataset), self.cfg.batch_size), desc="reference log-probs",
                          disable=not self.master, file=sys.stdout, leave=False):
            indices = range(start, min(start + self.cfg.batch_size, len(dataset)))
            batch = self.to_device(dataset.batch(indices))
            out.append(self._reference_logps(batch).float().cpu().view(2, -1).T)
        return torch.cat(out)

    def _reference_logps(self, batch) -> torch.Tensor:
        with torch.no_grad(), self.autocast, self.reference_model() as reference:
            return sequence_logps(reference(batch["input_ids"]), batch["labels"], batch["loss_mask"])

    def val_indices(self) -> list[list[int]]:
        """The validation batches: the first eval_iters * batch_size pairs (the same ones every evaluation)."""
        n, b = len(self.val_data), self.cfg.batch_size
        return [list(range(i, min(i + b, n))) for i in range(0, min(n, self.cfg.eval_iters * b), b)]

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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The training metrics, averaged over the same validation pairs each time, and the answer accuracy."""
        totals: dict[str, float] = {}
        batches = self.val_indices()
        for indices in batches:
            batch = self.to_device(self.val_data.batch(indices))
            with self.autocast:
                loss, metrics = self.compute_loss(self.model, batch)
            for name, value in {"loss": loss, **metrics}.items():
                totals[name] = totals.get(name, 0.0) + self.all_reduce_mean(value.float()) * len(indices)
        n = sum(len(indices) for indices in batches)
        results = {f"val_{name}": total / n for name, total in totals.items()}
        if self.answer_chats:  # the same on every rank: no reduction needed
            with self.autocast:
                results.update(answer_accuracy(self.model, self.tokenizer, self.answer_chats, self.cfg.max_new_tokens))
        return results

    def run_info(self) -> dict:
        return {**super().run_info(), "init_from": self.init_source}
