"""Benchmark: training and generation speed, peak memory and MFU, ours against HF transformers' Llama.

    python bench.py --preset minimind2-small --batch_size 8 --seq_len 256          # CPU, float32
    python bench.py --preset minimind2 --batch_size 16 --seq_len 1024              # GPU: bf16 autocast
    python bench.py --parts pretrain,generate --hf false --out my.json
    python bench.py --checkpoint hf:Qwen/Qwen2.5-0.5B-Instruct --batch_size 4 --seq_len 512   # a pretrained model

For the preset and batch shape given, it times training steps (forward, backward, AdamW) of
  pretrain   next-token loss over every token
  sft        the same with a loss mask (only the second half of each row counts, like reply tokens)
  dpo        batch_size preference pairs (2 * batch_size rows): policy forward/backward plus a no-grad
             forward of a frozen reference copy
  dpo_pre    the same with precomputed reference log-probabilities (no reference forward)
and generation at --gen_batch_size: prefill and KV-cache decode tokens/s with `GPT.generate` against HF
`generate` (greedy), beside the floor of decoding: the bare weight matrix-vector products of one token.
--quantize int8,nf4,fp16,bf16 adds copies of our model with their weights quantised (quant.py), decoding in the
same rounds as the float model and the floor, so that their speed-up is measured against it directly.
HF's LlamaForCausalLM (for --checkpoint, the model's own transformers class), built from our weights with
`hf.to_transformers`, runs at the same shape in the same process, interleaved step by step (who goes first
alternates) so that machine noise hits both. Warm-up steps are not counted; the median of the timed steps is
reported; CUDA timings synchronise. Peak memory is measured per implementation and part in a fresh child process
(CUDA max allocated; on CPU the peak RSS above the process's RSS after imports). MFU = FLOPs per token
(flops.py) x tokens/s over the device's peak: `--peak_tflops`, else flops.py's GPU table, else a large matmul
measured here (CPU).
"""

import copy
import json
import multiprocessing
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from configs import PRESETS, check_options, device_rules, exit_on_bad_input, get_config, option, parse_args
from devices import autocast, compile_or_eager, peak_rss_bytes, pick_compile, pick_device, pick_dtype
from fileio import writable_dir
from flops import device_peak_tflops, train_flops_per_token
from hf import load_config, to_transformers
from loss import DPOLoss, lm_loss, sequence_logps
from model import GPT
from quant import INFERENCE_HEAD, SCHEMES, linear_weight_bytes, quantize_model

PARTS = ("pretrain", "sft", "dpo", "dpo_pre", "generate")


@dataclass
class BenchConfig:
    preset: str = option("model preset (tiny, minimind2-small, minimind2, gpt2-124m)", default="minimind2-small")
    checkpoint: str = option("benchmark this pretrained model instead of a fresh preset: our checkpoint directory, a "
                             "Hugging Face model directory or hf:ORG/NAME (its vocabulary replaces --vocab_size)",
                             default="")
    vocab_size: int = option("vocabulary size (minimind's tokenizer has 6400)", default=6400)
    batch_size: int = option("training rows per step (DPO: pairs, so twice the rows)", default=8)
    seq_len: int = option("tokens per row", default=256)
    device: str = option("'auto' (cuda, then mps, then cpu), or cpu, cuda, mps", default="auto")
    dtype: str = option("'auto' (bf16 autocast on GPUs, float32 on CPU), float32, bfloat16, float16", default="auto")
    compile: str = option("torch.compile our model's training step and decode step: auto (CUDA on Linux), "
                          "true or false", default="auto")
    grad_checkpoint: bool = option("activation checkpointing in both models (ours and HF's)", default=False)
    parts: str = option(f"comma-separated, of: {', '.join(PARTS)}", default=",".join(PARTS))
    hf: bool = option("also measure HF transformers' LlamaForCausalLM (if installed)", default=True)
    warmup: int = option("untimed warm-up steps per part", default=2)
    steps: int = option("timed steps per part (the median is reported)", default=5)
    memory: bool = option("measure peak memory (one child process per implementation and part)", default=True)
    gen_batch_size: int = option("rows generated at once", default=1)
    prompt_len: int = option("prompt tokens for generation", default=64)
    new_tokens: int = option("tokens generated after the prompt", default=64)
    quantize: str = option(f"generation: also decode with copies of our model quantised in these comma-separated "
                           f"schemes ({', '.join(SCHEMES)}; the output head too, in 16 bits), in the same rounds as "
                           "the float model; '' = none", default="")
    peak_tflops: float = option("the device's peak TFLOPS for MFU; 0 = GPU table, else a measured matmul",
                                default=0.0)
    out: str = option("where the JSON results go", default="bench.json")

    def schemes(self) -> list[str]:
        """The schemes of --quantize."""
        return [s.strip() for s in self.quantize.split(",") if s.strip()]

    def __post_init__(self):
        parts = {p.strip() for p in self.parts.split(",") if p.strip()}
        check_options(self, [
            ("preset", self.preset in PRESETS, f"must be one of {', '.join(PRESETS)}"), *device_rules(self),
            ("parts", parts and parts <= set(PARTS), f"must be comma-separated names of {', '.join(PARTS)}"),
            ("quantize", set(self.schemes()) <= set(SCHEMES), f"must be comma-separated names of {', '.join(SCHEMES)}"),
            *((name, getattr(self, name) >= 1, "must be >= 1") for name in (
                "vocab_size", "batch_size", "seq_len", "steps", "gen_batch_size", "prompt_len", "new_tokens")),
            *((name, getattr(self, name) >= 0, "must be >= 0") for name in ("warmup", "peak_tflops"))])


# ----------------------------------------------------------------------------- peak
def device_peak(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOPS, where it came from): --peak_tflops, else flops.py's GPU table or measured matmul."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops, "--peak_tflops"
    return device_peak_tflops(device, dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds fn() takes, with the GPU's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn (the first of each round alternates)."""
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(warmup + steps):
        for name in names if i % 2 == 0 else names[::-1]:
            dt = timed(fns[name], device)
            if i >= warmup:
                times[name].append(dt)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- the models and steps
class Runner:
    """One implementation (ours or HF) with its optimizer and, for DPO, a frozen reference copy."""

    def __init__(self, name: str, model: torch.nn.Module, cfg: BenchConfig, device, dtype):
        self.name, self.model, self.device, self.dtype = name, model.to(device), device, dtype
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.forward = model
        self.reference = None
        if name == "ours":
            model.grad_checkpoint = cfg.grad_checkpoint
            self.forward = compile_or_eager(model, pick_compile(cfg.compile, device), "ours runs eager")
        elif cfg.grad_checkpoint:
            model.gradient_checkpointing_enable()

    def logits(self, model, ids):
        if self.name == "ours":
            return model(ids)
        return model(input_ids=ids, use_cache=False).logits

    def train_step(self, part: str, batch: dict) -> torch.Tensor:
        """One optimizer step of `part` on batch (input_ids, labels, loss_mask, ref_logps); its loss."""
        self.model.train()
        with autocast(self.device, self.dtype):
            logits = self.logits(self.forward, batch["input_ids"])
            if part == "pretrain":
                loss = lm_loss(logits, batch["labels"])
            elif part == "sft":
                loss = lm_loss(logits, batch["labels"], batch["loss_mask"])
            else:
                ref_logps = batch["ref_logps"] if part == "dpo_pre" else self.reference_logps(batch)
                policy_chosen, policy_rejected = sequence_logps(logits, batch["labels"], batch["loss_mask"]).chunk(2)
                loss = DPOLoss()(policy_chosen, policy_rejected, *ref_logps.chunk(2))[0]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def reference_logps(self, batch):
        if self.reference is None:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        return sequence_logps(self.logits(self.reference, batch["input_ids"]), batch["labels"], batch["loss_mask"])


def make_batch(part: str, cfg: BenchConfig, device) -> dict:
    rows = 2 * cfg.batch_size if part.startswith("dpo") else cfg.batch_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len + 1), generator=g)
    mask = torch.zeros(rows, cfg.seq_len)
    mask[:, cfg.seq_len // 2:] = 1  # the "reply" half
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
             "ref_logps": -torch.rand(rows, generator=g) * cfg.seq_len}
    return {k: v.to(device) for k, v in batch.items()}


def build_runners(cfg: BenchConfig, device, dtype, names=("ours", "hf")) -> dict[str, Runner]:
    torch.manual_seed(0)
    if cfg.checkpoint:
        ours = GPT.from_pretrained(cfg.checkpoint)
    else:
        ours = GPT(get_config(cfg.preset, vocab_size=cfg.vocab_size, max_seq_len=max(
            cfg.seq_len, cfg.prompt_len + cfg.new_tokens, get_config(cfg.preset).max_seq_len)))
    runners = {}
    if "hf" in names:
        runners["hf"] = Runner("hf", to_transformers(ours), cfg, device, dtype)
    if "ours" in names:
        runners["ours"] = Runner("ours", ours, cfg, device, dtype)
    return {n: runners[n] for n in names}


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- memory (child processes)
def memory_probe(cfg_dict: dict, name: str, part: str) -> float:
    """Peak bytes of two training steps of one implementation and part, in this (fresh) process."""
    cfg = BenchConfig(**cfg_dict)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    hf_available()  # both implementations pay the same imports before the baseline
    baseline = 0 if device.type == "cuda" else peak_rss_bytes()
    runner = build_runners(cfg, device, dtype, (name,))[name]
    batch = make_batch(part, cfg, device)
    for _ in range(2):
        runner.train_step(part, batch)
    sync(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes() - baseline


def peak_memory(cfg: BenchConfig, name: str, part: str) -> float | None:
    """Peak MiB of one implementation and part, measured in a fresh process (None where unmeasurable)."""
    if pick_device(cfg.device).type not in ("cuda", "cpu") or peak_rss_bytes() is None:
        return None  # CUDA has its allocator statistics; on CPU, the peak RSS (not on Windows)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(memory_probe, (asdict(cfg), name, part)) / 2**20


# ----------------------------------------------------------------------------- generation
def weight_matrices(model: GPT, fused: bool) -> list[torch.Tensor]:
    """The weight matrices one decoded token multiplies by, in order (optionally q/k/v and gate/up fused)."""
    mats = []
    for layer in model.layers:
        a = layer.attn
        # A MoE layer: the router, the shared experts and the top-k routed experts a token is sent to.
        mlps = ([layer.mlp] if not model.config.use_moe else
                [*layer.mlp.shared_experts, *layer.mlp.experts[:model.config.num_experts_per_tok]])
        qkv = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        mats += ([torch.cat(qkv)] if fused else qkv) + [a.o_proj.weight]
        for m in mlps:
            up = [m.gate_proj.weight, m.up_proj.weight] if m.gated else [m.up_proj.weight]  # GPT-2's MLP has no gate
            mats += ([torch.cat(up)] if fused else up) + [m.down_proj.weight]
        if model.config.use_moe:
            mats.append(layer.mlp.router.weight)
    return mats + [model.lm_head.weight]


def matvec_pass(model: GPT, batch: int, device, fused: bool):
    """A function doing one decoded token's bare weight matrix-vector products: the floor of decoding (at
    batch 1 it only streams the weights from memory), on copies of the weights."""
    mats = [w.detach().clone() for w in weight_matrices(model, fused)]
    x = {w.shape[1]: torch.randn(batch, w.shape[1], device=device, dtype=w.dtype) for w in mats}

    def run():
        for w in mats:
            F.linear(x[w.shape[1]], w)

    return run


@torch.no_grad()
def bench_generate(runners: dict[str, Runner], cfg: BenchConfig, device, dtype) -> dict:
    """Prefill and decode tokens/s (greedy, KV cache) for each implementation, and the matvec floor."""
    prompt = torch.randint(0, cfg.vocab_size, (cfg.gen_batch_size, cfg.prompt_len), device=device)
    n = cfg.new_tokens
    for r in runners.values():
        r.model.eval().to(dtype)  # inference runs in the benchmark dtype itself
        r.optimizer = r.reference = None
    floors = {fused: matvec_pass(runners["ours"].model, cfg.gen_batch_size, device, fused) for fused in (False, True)}
    # Ours, and ours quantised in each scheme of --quantize (the floor stays the float model's).
    models = {"ours": runners["ours"].model}
    for scheme in cfg.schemes():
        models[f"ours_{scheme}"] = quantize_model(copy.deepcopy(models["ours"]), scheme, head=INFERENCE_HEAD[scheme])
    if pick_compile(cfg.compile, device):
        for name, model in models.items():
            if model.compile_decoding():
                print(f"{name} decodes with a compiled step (GPT.compile_decoding)")
    # generate = one prefill (which yields the first token) + n - 1 single-token steps
    prefills = {k: (lambda m=m: m(prompt, cache=m.new_kv_cache(prompt.shape[0], cfg.prompt_len)))
                for k, m in models.items()}
    generations = {k: (lambda m=m: m.generate(prompt, n, temperature=0)) for k, m in models.items()}
    if "hf" in runners:
        hf = runners["hf"].model
        hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
        prefills["hf"] = lambda: hf(input_ids=prompt, use_cache=True)
        generations["hf"] = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                                min_new_tokens=n, do_sample=False)

    def floor(fused):
        return lambda: [floors[fused]() for _ in range(n - 1)]

    t_prefill = interleaved(prefills, cfg.warmup, cfg.steps, device)
    # The floor runs in the same rounds as generation, so that machine noise hits all of them alike.
    t_gen = interleaved({**generations, "floor_tok_s": floor(False), "floor_fused_tok_s": floor(True)}, 1,
                        max(3, cfg.steps // 2), device)
    results = {k: {"prefill_tok_s": prompt.numel() / t_prefill[k],
                   "decode_tok_s": cfg.gen_batch_size * (n - 1) / max(t_gen[k] - t_prefill[k], 1e-9)}
               for k in generations}
    results["floor"] = {k: cfg.gen_batch_size * (n - 1) / t_gen[k] for k in ("floor_tok_s", "floor_fused_tok_s")}
    for k, model in models.items():
        results[k].update(quantize=k.removeprefix("ours_") if k != "ours" else dtype_name(dtype),
                          weight_bytes_per_token=linear_weight_bytes(model),
                          decode_vs_ours=results[k]["decode_tok_s"] / results["ours"]["decode_tok_s"])
    return results


# ----------------------------------------------------------------------------- main
def main(cfg: BenchConfig) -> dict:
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    writable_dir(Path(cfg.out).resolve().parent, "--out")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    names = ("ours", "hf") if cfg.hf and hf_available() else ("ours",)
    if cfg.hf and "hf" not in names:
        print("transformers is not installed: measuring ours only")
    if cfg.checkpoint:  # random batches from the checkpoint's vocabulary
        config = load_config(cfg.checkpoint)
        cfg = replace(cfg, vocab_size=config.vocab_size)
    else:
        config = get_config(cfg.preset, vocab_size=cfg.vocab_size)
    peak, peak_source = device_peak(cfg, device, dtype)
    runners = build_runners(cfg, device, dtype, names)
    flops = train_flops_per_token(config, cfg.seq_len)
    report = {"config": asdict(cfg), "device": device_description(device), "dtype": dtype_name(dtype),
              "torch": torch.__version__, "params": runners["ours"].model.num_params(),
              "train_flops_per_token": flops, "peak_tflops": peak, "peak_source": peak_source, "train": {}}
    print(f"{cfg.checkpoint or cfg.preset}: {report['params'] / 1e6:.1f}M parameters, {report['device']}, "
          f"{report['dtype']}, batch {cfg.batch_size} x {cfg.seq_len}; peak {peak:.2f} TFLOPS ({peak_source})")

    for part in (p for p in parts if p != "generate"):
        batch = make_batch(part, cfg, device)
        tokens = batch["input_ids"].numel()
        # FLOPs of the step per token: the reference model's forward adds a third of a training step.
        step_flops = flops * (4 / 3 if part == "dpo" else 1)
        steps = {k: (lambda r=r, part=part, batch=batch: r.train_step(part, batch)) for k, r in runners.items()}
        t = interleaved(steps, cfg.warmup, cfg.steps, device)
        report["train"][part] = {k: {"tok_s": tokens / t[k], "mfu": step_flops * tokens / t[k] / (peak * 1e12),
                                     "peak_mem_mb": peak_memory(cfg, k, part) if cfg.memory else None}
                                 for k in runners}
        if part == "dpo":
            for r in runners.values():  # free the reference copies before the next part
                r.reference = None
    if "generate" in parts:
        report["generate"] = bench_generate(runners, cfg, device, dtype)
    print_table(report)
    with open(cfg.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {cfg.out}")
    return report


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def print_table(report: dict):
    rows = [("part", "ours tok/s", "HF tok/s", "ours/HF", "ours MFU", "HF MFU", "ours MB", "HF MB")]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for part, r in report["train"].items():
        ours, hf = r["ours"], r.get("hf", {})
        rows.append((part, fmt(ours["tok_s"], ".0f"), fmt(hf.get("tok_s"), ".0f"),
                     fmt(ours["tok_s"] / hf["tok_s"] if hf else None, ".2f"), fmt(ours["mfu"], ".1%"),
                     fmt(hf.get("mfu"), ".1%"), fmt(ours["peak_mem_mb"], ".0f"), fmt(hf.get("peak_mem_mb"), ".0f")))
    gen = report.get("generate")
    if gen:
        for key in ("prefill_tok_s", "decode_tok_s"):
            ours, hf = gen["ours"][key], gen.get("hf", {}).get(key)
            rows.append((key.removesuffix("_tok_s"), fmt(ours, ".0f"), fmt(hf, ".0f"),
                         fmt(ours / hf if hf else None, ".2f"), "", "", "", ""))
        f = gen["floor"]
        # ours' decode speed as a share of the bare matrix-vector floor
        rows.append(("matvec floor", f"{f['floor_tok_s']:.0f}", f"fused {f['floor_fused_tok_s']:.0f}",
                     f"ours {gen['ours']['decode_tok_s'] / f['floor_tok_s']:.0%}", "", "", "", ""))
        for k in (k for k in gen if k.startswith("ours")):  # decode of ours in each precision against float
            g = gen[k]
            rows.append((f"{g['quantize']} decode", f"{g['decode_tok_s']:.0f}", f"{g['decode_vs_ours']:.2f}x",
                         f"floor {g['decode_tok_s'] / f['floor_tok_s']:.0%}",
                         f"{g['weight_bytes_per_token'] / 1e6:.1f} MB/token", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    config = parse_args(BenchConfig, description=__doc__)
    with exit_on_bad_input():
        main(config)
