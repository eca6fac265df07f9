"""Quantisation (quant.py): NF4 codes against bitsandbytes, round-trip error bounds, the CPU kernels against the
torch path, whole models, quantised checkpoints, and QLoRA (lora.py on a quantised base)."""

import math
import platform
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import demo
import lora
import quant
import serve
from configs import (
    LORA_TARGETS,
    DPOConfig,
    GRPOConfig,
    LoRAConfig,
    ModelConfig,
    PPOConfig,
    RewardConfig,
    parse_train_args,
)
from eval import EvalConfig
from model import GPT
from pretrained import load_checkpoint
from rl import GRPOTrainer, PPOTrainer, RewardTrainer
from tests.helpers import TINY_MODEL, crash_during_step, make_chats, make_checkpoint, write_jsonl
from trainers import DPOTrainer, LoRATrainer

MODEL = {**TINY_MODEL, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128}  # in_features multiples of 64


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": 96, **MODEL, **overrides})).eval()


def dequantized_copy(model: GPT, quantized: GPT) -> GPT:
    """model with each weight replaced by what the quantised layer of the same name stands for."""
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, quant.QuantLinear):
                model.get_submodule(name).weight = nn.Parameter(m.dequantize())
    return model


# ----------------------------------------------------------------------------- bitsandbytes parity
@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes.functional")


def test_levels_and_maps_equal_bitsandbytes(bnb):
    assert torch.equal(quant.NF4_LEVELS, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(quant.DYNAMIC_MAP, bnb.create_dynamic_map(signed=True))
    assert quant.NF4_LEVELS[quant.NF4_ZERO] == 0


@pytest.mark.parametrize("shape, dtype", [((128, 192), torch.float32), ((33, 77), torch.float32),
                                          ((7,), torch.float32), ((64, 128), torch.bfloat16)])
def test_nf4_codes_and_absmax_equal_bitsandbytes(bnb, shape, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    w.view(-1)[3] = 0.5  # an outlier, so one block's scale differs from the rest
    w.view(-1)[64:128] = 0  # an all-zero block
    codes, absmax = quant.quantize_nf4(w)
    theirs, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert codes.dtype == torch.uint8 and torch.equal(codes, theirs.view(-1))
    assert torch.equal(absmax, state.absmax)
    if w.numel() % 64 == 0:  # (bitsandbytes compiles its dequantisation of other sizes with torch.compile: slow)
        assert torch.equal(quant.dequantize_nf4(codes, absmax, shape, dtype=dtype), bnb.dequantize_4bit(theirs, state))


def test_double_quantisation_as_bitsandbytes_does_it(bnb):
    torch.manual_seed(0)
    w = torch.randn(256, 1408) * 0.02
    codes, absmax = quant.quantize_nf4(w)
    absmax_codes, absmax_scale, offset = quant.double_quantize(absmax)
    theirs, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(codes, theirs.view(-1))
    assert torch.equal(offset, state.offset) and torch.equal(absmax_scale, state.state2.absmax)
    # bitsandbytes' CPU kernel looks the nearest of the 256 levels up with an approximate binary search: a value
    # closer than about 1e-4 (of its block's absmax) to the midpoint of two levels can get the farther one. Ours
    # is always the nearest (as bitsandbytes' pure-torch kernel does it); the codes may differ only there.
    scaled = ((absmax - offset).view(-1, 256) / absmax_scale[:, None]).view(-1)
    ours, theirs_codes = absmax_codes.long(), state.absmax.view(-1).long()
    levels = quant.DYNAMIC_MAP
    ours_gap, theirs_gap = (scaled - levels[ours]).abs(), (scaled - levels[theirs_codes]).abs()
    differ = ours != theirs_codes
    assert differ.float().mean() < 0.01 and (ours_gap <= theirs_gap + 1e-7).all()
    assert ((theirs_gap - ours_gap)[differ] < 1e-4).all()
    # bitsandbytes dequantises our codes to exactly what we do.
    state.absmax = absmax_codes
    ours = quant.dequantize_nf4(codes, quant.double_dequantize(absmax_codes, absmax_scale, offset), w.shape)
    assert torch.equal(ours, bnb.dequantize_4bit(theirs, state))


# ----------------------------------------------------------------------------- round-trip error bounds
def test_round_trip_errors_stay_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(96, 192) * 0.02
    w[5, 7] = 0.3  # an outlier
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    assert ((quant.dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()

    codes, absmax = quant.quantize_nf4(w)
    assert codes.numel() == w.numel() // 2 and absmax.numel() == w.numel() // 64
    largest_half_gap = ((quant.NF4_LEVELS[1:] - quant.NF4_LEVELS[:-1]) / 2).max()  # 0.139, between 0.72 and 1
    error = (quant.dequantize_nf4(codes, absmax, w.shape) - w).view(-1, 64).abs()
    assert (error <= absmax[:, None] * largest_half_gap * (1 + 1e-5)).all()
    assert error.mean() < 0.1 * w.abs().mean() * 2  # on normal weights NF4 is far better than the worst case

    absmax_codes, absmax_scale, offset = quant.double_quantize(absmax)
    back = quant.double_dequantize(absmax_codes, absmax_scale, offset)
    largest_gap = (quant.DYNAMIC_MAP[1:] - quant.DYNAMIC_MAP[:-1]).max()
    assert ((back - absmax).abs() <= absmax_scale.max() * largest_gap / 2 * (1 + 1e-5)).all()

    for scheme, dtype, eps in (("fp16", torch.float16, 2**-11), ("bf16", torch.bfloat16, 2**-8)):
        layer = quant.QuantLinear(nn.Linear(192, 96, bias=False), scheme)
        layer.qweight.copy_(w.to(dtype))
        assert layer.qweight.dtype == dtype
        assert ((layer.dequantize() - w).abs() <= w.abs() * eps + 2**-25).all()  # (+ fp16's subnormal steps)


# ----------------------------------------------------------------------------- the layer and its kernels
def kernels_expected() -> bool:
    """The kernels must build where a C++ compiler and an x86 CPU with AVX2 are: a failed build there is a bug."""
    return (platform.machine().lower() in ("x86_64", "amd64") and shutil.which("c++") is not None
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_kernels_compute_the_dequantised_product(scheme):
    if not kernels_expected():
        pytest.skip("the mat-vec kernels need an x86-64 CPU with AVX2 and a C++ compiler")
    torch.manual_seed(0)
    in_features = 192 if scheme == "nf4" else 200  # 200: the kernels' scalar tail (not a multiple of 32)
    linear = nn.Linear(in_features, 72, bias=True)
    layer = quant.QuantLinear(linear, scheme)
    assert quant.cpu_kernels_ready()
    reference = F.linear  # the same product through torch, with the dequantised weight
    for rows in (1, 3, quant.KERNEL_MAX_ROWS + 1):
        x = torch.randn(1, rows, in_features)
        with torch.no_grad():
            assert layer.uses_kernel(x) == (rows <= quant.KERNEL_MAX_ROWS)
            torch.testing.assert_close(layer(x), reference(x, layer.dequantize(), linear.bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, in_features, requires_grad=True)
    assert not layer.uses_kernel(x)  # gradients go through the torch path
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(2, -1))


def test_without_a_compiler_the_layer_dequantises(monkeypatch, capsys):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found\nmore")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setitem(quant._kernels, "state", "unbuilt")
    layer = quant.QuantLinear(nn.Linear(128, 64), "int8")
    x = torch.randn(1, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias))
    assert not quant.cpu_kernels_ready()
    err = capsys.readouterr().err
    assert "quant: no CPU kernels (RuntimeError: Error building extension: c++: not found); dequantising" in err


def test_dtype_casts_leave_the_stored_formats_alone():
    model = quant.quantize_model(tiny_gpt(), "fp16")
    layer = model.layers[0].attn.q_proj
    model.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.float16 and model.embed.weight.dtype == torch.bfloat16
    model = quant.quantize_model(tiny_gpt(), "int8").to(torch.float16)
    assert model.layers[0].mlp.up_proj.scale.dtype == torch.float32


# ----------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("scheme, tolerance", [("int8", 0.02), ("nf4", 0.2), ("fp16", 2e-3), ("bf16", 1e-2)])
def test_quantize_model_swaps_the_linear_layers(scheme, tolerance):
    reference = tiny_gpt()
    model = quant.quantize_model(tiny_gpt(), scheme)
    layers = [n for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)]
    assert len(layers) == 7 * MODEL["n_layers"] and "lm_head" not in layers
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert model.lm_head.weight is model.embed.weight  # the tied head stays float
    assert quant.quantization_of(model) == {"scheme": scheme, "head": False, "double_quant": False, "block_size": 64}
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        got, want = model(idx), reference(idx)
        torch.testing.assert_close(got, dequantized_copy(tiny_gpt(), model)(idx), rtol=1e-4, atol=1e-4)
    assert (got - want).norm() / want.norm() < tolerance
    with pytest.raises(ValueError, match=f"already quantised \\({scheme}\\)"):
        quant.quantize_model(model, "int8")


def test_the_head_is_quantised_only_when_asked():
    untied = quant.quantize_model(tiny_gpt(tie_embeddings=False), "int8")
    assert isinstance(untied.lm_head, nn.Linear)
    tied = tiny_gpt()
    embedding = tied.embed.weight.detach().clone()
    quant.quantize_model(tied, "int8", head=True)
    assert isinstance(tied.lm_head, quant.QuantLinear) and quant.quantization_of(tied)["head"] == "int8"
    assert torch.equal(tied.embed.weight, embedding)  # the embedding keeps its float weight
    mixed = quant.quantize_model(tiny_gpt(), "nf4", head="fp16")  # a head in another scheme
    assert mixed.lm_head.qweight.dtype == torch.float16 and mixed.layers[0].mlp.up_proj.scheme == "nf4"
    assert quant.quantization_of(mixed) == {"scheme": "nf4", "head": "fp16", "double_quant": False, "block_size": 64}
    for scheme, head in (("int4", False), ("int8", "int4")):
        with pytest.raises(ValueError, match="unknown quantisation scheme 'int4'; choose one of int8, nf4, fp16, bf16"):
            quant.quantize_model(tiny_gpt(), scheme, head=head)


@pytest.mark.parametrize("scheme, kwargs", [("nf4", {"double_quant": True}), ("int8", {"head": True}),
                                            ("int8", {"head": "fp16"}), ("bf16", {})])
def test_quantised_checkpoints_save_and_load(tmp_path, tokenizer, scheme, kwargs):
    model = quant.quantize_model(tiny_gpt(vocab_size=tokenizer.vocab_size), scheme, **kwargs)
    directory = quant.save_quantized(tmp_path / "q", model, tokenizer, {"stage": "quantised", "step": 0})
    assert checkpoint.saved_quantization(directory) == quant.quantization_of(model)
    saved = checkpoint.read_tensors(directory / checkpoint.WEIGHTS)
    assert saved["layers.0.attn.q_proj.qweight"].dtype == model.layers[0].attn.q_proj.qweight.dtype
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    for asked in (None, scheme):
        loaded = GPT.from_pretrained(directory, quantize=asked).eval()
        assert quant.quantization_of(loaded) == quant.quantization_of(model)
        with torch.no_grad():
            assert torch.equal(loaded(idx), model(idx))
    other = "int8" if scheme != "int8" else "nf4"
    with pytest.raises(ValueError, match=f"model.safetensors: quantised as {scheme}, cannot load it as {other}"):
        GPT.from_pretrained(directory, quantize=other)


def test_a_float_checkpoint_loads_quantised_for_inference(tmp_path, tokenizer):
    model = tiny_gpt(vocab_size=tokenizer.vocab_size)
    checkpoint.save_checkpoint(tmp_path / "f", model, tokenizer, {"stage": "pretrain", "step": 0})
    loaded = GPT.from_pretrained(tmp_path / "f", quantize="nf4")
    # For inference the head is quantised too, in 16 bits (quant.INFERENCE_HEAD)
    assert quant.quantization_of(loaded) == {"scheme": "nf4", "head": "fp16", "double_quant": False, "block_size": 64}
    with pytest.raises(ValueError, match="save_quantized: the model is not quantised"):
        quant.save_quantized(tmp_path / "x", model, tokenizer, {})


def test_compiled_decoding_uses_the_kernels():
    if not kernels_expected():
        pytest.skip("the mat-vec kernels need an x86-64 CPU with AVX2 and a C++ compiler")
    model = quant.quantize_model(tiny_gpt(), "int8", head=True)
    prompt = torch.randint(0, 96, (1, 5))
    eager = model.generate(prompt, 8, temperature=0)
    assert model.compile_decoding()
    with torch.profiler.profile() as profile:  # it sees the calls made from the compiled step's C++ code too
        assert torch.equal(model.generate(prompt, 8, temperature=0), eager)
    calls = sum(event.name == "nanollm_quant::int8_matvec" for event in profile.events())
    assert calls == 8 * (7 * MODEL["n_layers"] + 1)  # the prompt (eager) and 7 compiled steps, every layer and head


# ----------------------------------------------------------------------------- QLoRA
def randomise_adapters(model):
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.normal_(0, 0.2)


def test_qlora_trains_adapters_on_a_frozen_nf4_base():
    shape = {"hidden_dim": 192}  # no quantised weight has the shape of the (float, tied) head: 128 x 64
    model = quant.quantize_model(tiny_gpt(**shape), "nf4", double_quant=True)
    stored = {n: b.clone() for n, b in model.named_buffers()}
    counts = lora.apply_lora(model, r=4, alpha=8)
    assert counts["wrapped"] == 7 * MODEL["n_layers"]
    randomise_adapters(model)
    # The same adapters on a float model holding the dequantised weights: outputs and gradients must agree.
    reference = tiny_gpt(**shape)
    dequantized_copy(reference, quant.quantize_model(tiny_gpt(**shape), "nf4", double_quant=True))
    lora.apply_lora(reference, r=4, alpha=8)
    reference.load_state_dict(lora.adapter_state(model), strict=False)
    model.train(), reference.train()
    idx = torch.randint(0, 96, (3, 16))  # 48 rows: no activation has a weight's shape either
    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(idx).logsumexp(-1).mean()
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, quant.QuantLinear)}
    assert not weight_shapes & set(saved_shapes)  # backward dequantises again: no float weight is kept for it
    reference_loss = reference(idx).logsumexp(-1).mean()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    loss.backward(), reference_loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    reference_params = dict(reference.named_parameters())
    for name, p in trainable.items():
        assert p.dtype == torch.float32 and p.grad is not None
        torch.testing.assert_close(p.grad, reference_params[name].grad, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(b, stored[n.replace(".base.", ".")]) for n, b in model.named_buffers())
    with pytest.raises(ValueError, match="cannot merge LoRA adapters into a nf4-quantised weight in place"):
        lora.lora_layers(model)[0].merge()


def test_qlora_adapters_merge_into_the_dequantised_base(tmp_path, tokenizer):
    base = tiny_gpt(vocab_size=tokenizer.vocab_size)
    checkpoint.save_checkpoint(tmp_path / "base", base, tokenizer, {"stage": "sft", "step": 3})
    model = quant.quantize_model(GPT.from_pretrained(tmp_path / "base"), "nf4")
    lora.apply_lora(model, r=4, alpha=8)
    randomise_adapters(model)
    settings = {"r": 4, "alpha": 8, "targets": list(LORA_TARGETS)}
    lora.save_lora_checkpoint(tmp_path / "qlora", model, tokenizer, tmp_path / "base", settings, {"step": 5})
    assert lora.read_adapter_config(tmp_path / "qlora")["quantization"] == quant.quantization_of(model)
    reloaded, _ = lora.load_lora_checkpoint(tmp_path / "qlora")
    assert quant.quantization_of(reloaded)["scheme"] == "nf4"
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    model.eval()
    with torch.no_grad():
        want = model(idx)
        assert torch.equal(reloaded(idx), want)
        merged = GPT.from_pretrained(lora.export_merged(tmp_path / "qlora", tmp_path / "merged")).eval()
        assert quant.quantization_of(merged) is None
        assert all(isinstance(m, nn.Linear) for n, m in merged.named_modules() if n.endswith("_proj"))
        torch.testing.assert_close(merged(idx), want, rtol=1e-4, atol=1e-4)
    # Adapters on some layers only: the layers without adapters come back as float layers too.
    partial = quant.quantize_model(tiny_gpt(), "int8")
    lora.apply_lora(partial, targets=["v_proj"], r=2, alpha=2)
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        want = partial(idx)
        lora.merge_and_unload(partial)
        assert quant.quantization_of(partial) is None and not lora.lora_layers(partial)
        torch.testing.assert_close(partial(idx), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the stages: QLoRA, DPO, loading
def qlora_config(d, **kw) -> LoRAConfig:
    return LoRAConfig(**{**dict(data_dir=str(d), out_dir=str(d / "qlora"), init_from=str(d / "pretrain"),
                                sft_data=str(d / "train.jsonl"), sft_val_data=str(d / "val.jsonl"), device="cpu",
                                batch_size=8, max_steps=8, warmup_steps=2, lr=1e-2, eval_iters=2, log_interval=4,
                                save_interval=4, eval_samples=0, lora_r=4, quantize="nf4"), **kw})


def test_qlora_trainer_trains_saves_and_resumes_on_its_scheme(sft_dirs):
    trainer = LoRATrainer(qlora_config(sft_dirs, max_steps=16), {})
    assert quant.quantization_of(trainer.model) == {"scheme": "nf4", "head": False, "double_quant": False,
                                                    "block_size": 64}
    assert all(".lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    before = trainer.evaluate()["val_loss"]
    qlora_loss = trainer.train()["val_loss"]
    lora_loss = LoRATrainer(qlora_config(sft_dirs, max_steps=16, quantize="", out_dir=str(sft_dirs / "lora")),
                            {}).train()["val_loss"]
    assert qlora_loss < before - 0.2 and qlora_loss == pytest.approx(lora_loss, rel=0.05)
    out = sft_dirs / "qlora"
    assert lora.read_adapter_config(out)["quantization"]["scheme"] == "nf4"
    model, _ = lora.load_lora_checkpoint(out)
    trainer.model.eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    assert torch.equal(model(idx), trainer.model(idx))

    # An interrupted QLoRA run resumes on its own scheme to the same result as an uninterrupted one.
    whole = LoRATrainer(qlora_config(sft_dirs, out_dir=str(sft_dirs / "whole")), {}).train()["val_loss"]
    crashing = LoRATrainer(qlora_config(sft_dirs, out_dir=str(sft_dirs / "resumed")), {})
    crash_during_step(crashing, 6, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    resumed = LoRATrainer(qlora_config(sft_dirs, out_dir=str(sft_dirs / "resumed"), resume=True, quantize=""), {})
    assert resumed.step == 4 and quant.quantization_of(resumed.model)["scheme"] == "nf4"
    assert resumed.train()["val_loss"] == pytest.approx(whole, abs=1e-6)
    # Another scheme is refused with one line, when resuming and when loading the adapters to chat with.
    with pytest.raises(ValueError, match=r"qlora/adapter_config.json: the adapters were trained on a nf4 base; "
                                         r"--resume cannot continue them on a int8 one"):
        LoRATrainer(qlora_config(sft_dirs, resume=True, quantize="int8"), {})
    with pytest.raises(ValueError, match=r"qlora/adapter_config.json: quantised as nf4, cannot load it as int8"):
        load_checkpoint(out, quantize="int8")
    assert quant.quantization_of(load_checkpoint(out, quantize="nf4")[0])["scheme"] == "nf4"


def test_scheme_flags_are_checked_once_for_every_stage_and_entry_point(tmp_path):
    with pytest.raises(SystemExit, match=r"error: --quantize must be one of int8, nf4, fp16, bf16 .*, got int4$"):
        parse_train_args(LoRAConfig, ["--quantize", "int4"])
    for config in (DPOConfig, GRPOConfig, RewardConfig, demo.DemoConfig, serve.ServeConfig):
        with pytest.raises(ValueError, match="--quantize must be one of"):
            config(quantize="4bit")
    with pytest.raises(ValueError, match="--quantize must be one of"):
        EvalConfig(checkpoint=["c"], task="perplexity", quantize="4bit")
    with pytest.raises(ValueError, match="--reference_quant must be one of"):
        DPOConfig(reference_quant="int4")
    for config in (DPOConfig, GRPOConfig, RewardConfig):  # the stages whose LoRA is optional
        with pytest.raises(ValueError, match="--quantize holds the frozen base of LoRA adapters quantised, so it "
                                             "needs --lora"):
            config(quantize="nf4")
        config(quantize="nf4", lora=True)
    with pytest.raises(ValueError, match="--reference_quant does not apply with --lora"):
        DPOConfig(reference_quant="nf4", lora=True)
    with pytest.raises(ValueError, match="--reference_quant does not apply with --precompute_ref"):
        DPOConfig(reference_quant="nf4", precompute_ref=True)


@pytest.fixture
def dpo_dirs(tmp_path, tokenizer):
    make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    pairs = [{"prompt": f"{n} has a {good} and a {bad}. What does {n} like?", "chosen": f"{n} likes the {good}.",
              "rejected": f"{n} likes the {bad}."}
             for n in ("Tom", "Mia", "Ben", "Lily") for good in ("ball", "kite") for bad in ("cat", "cake")]
    write_jsonl(tmp_path / "train.jsonl", pairs[:12])
    write_jsonl(tmp_path / "val.jsonl", pairs[12:])
    return tmp_path


def make_dpo(root, **train) -> DPOTrainer:
    options = dict(init_from=str(root / "sft"), out_dir=str(root / "dpo"), data_dir=str(root),
                   train_file=str(root / "train.jsonl"), val_file=str(root / "val.jsonl"), device="cpu", batch_size=4,
                   max_steps=20, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_interval=20, eval_iters=1,
                   save_interval=10, beta=0.5, eval_samples=0)
    return DPOTrainer(DPOConfig(**{**options, **train}))


def test_dpo_with_an_int8_reference(dpo_dirs):
    trainer = make_dpo(dpo_dirs, reference_quant="int8")
    reference = trainer.reference
    assert quant.quantization_of(reference) == {"scheme": "int8", "head": False, "double_quant": False,
                                                "block_size": 64}  # the tied head stays the embedding
    assert quant.quantization_of(trainer.model) is None  # the policy trains in full precision
    float_bytes = quant.linear_weight_bytes(trainer.model) - trainer.model.embed.weight.numel() * 4
    assert quant.linear_weight_bytes(reference) - reference.embed.weight.numel() * 4 < float_bytes / 3
    # Its log-probabilities stay close to the float reference's: the policy starts almost where the reference is.
    assert trainer.evaluate()["val_loss"] == pytest.approx(math.log(2), abs=2e-3)
    results = trainer.train()
    assert results["val_rewards/accuracy"] > 0.9 and results["val_rewards/margin"] > 0
    resumed = make_dpo(dpo_dirs, reference_quant="int8", max_steps=24, resume=True)
    assert resumed.step == 20 and quant.quantization_of(resumed.reference)["scheme"] == "int8"


def test_dpo_with_lora_on_an_nf4_base(dpo_dirs):
    trainer = make_dpo(dpo_dirs, lora=True, quantize="nf4", lr=1e-2)
    assert trainer.reference is None and quant.quantization_of(trainer.model)["scheme"] == "nf4"
    assert trainer.evaluate()["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # reference = the nf4 base
    results = trainer.train()
    assert results["val_rewards/accuracy"] > 0.9 and results["val_rewards/margin"] > 0
    assert lora.read_adapter_config(dpo_dirs / "dpo")["quantization"]["scheme"] == "nf4"


def test_demo_and_server_load_quantised_through_one_flag(tmp_path, tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    cfg = demo.DemoConfig(checkpoint=str(ckpt), quantize="int8", prompt="hi", temperature=0, max_new_tokens=4,
                          compile="false", device="cpu", output_dir=str(tmp_path / "demo"))
    model = demo.Demo(cfg).model
    assert quant.quantization_of(model) == {"scheme": "int8", "head": "fp16", "double_quant": False, "block_size": 64}
    server = serve.load_server(serve.ServeConfig(checkpoint=str(ckpt), quantize="fp16", device="cpu"))
    assert quant.quantization_of(server.engine.model)["scheme"] == "fp16"
    saved = quant.save_quantized(tmp_path / "nf4", GPT.from_pretrained(ckpt, quantize="nf4"), tokenizer,
                                 {"stage": "sft", "step": 0})
    with pytest.raises(SystemExit, match=r"error: .*nf4/model.safetensors: quantised as nf4, cannot load it as int8"):
        demo.main(["--checkpoint", str(saved), "--quantize", "int8", "--prompt", "hi"])


def test_the_rl_stages_take_qlora_through_the_shared_path(tmp_path, tokenizer):
    make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    write_jsonl(tmp_path / "prompts.jsonl", make_chats(16, 0))
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{n} has a ball. What is it?", "chosen": "The ball.",
                                            "rejected": "No."} for n in ("Tom", "Mia", "Ben", "Lily")])
    common = dict(device="cpu", init_from=str(tmp_path / "sft"), data_dir=str(tmp_path), max_steps=2, warmup_steps=1,
                  eval_interval=100, save_interval=100, eval_samples=0, seq_len=0, lora=True, lora_r=4,
                  quantize="nf4")
    rollouts = dict(train_file=str(tmp_path / "prompts.jsonl"), batch_size=2, num_generations=2,
                    max_completion_length=4)
    for trainer in (GRPOTrainer(GRPOConfig(**common, **rollouts, beta=0.1, out_dir=str(tmp_path / "grpo"))),
                    PPOTrainer(PPOConfig(**common, **rollouts, out_dir=str(tmp_path / "ppo"))),
                    RewardTrainer(RewardConfig(**common, train_file=str(tmp_path / "pairs.jsonl"), batch_size=2,
                                               val_file=str(tmp_path / "pairs.jsonl"), out_dir=str(tmp_path / "rm")))):
        assert quant.quantization_of(trainer.model)["scheme"] == "nf4" and trainer.reference is None
        trainer.train()
        assert lora.read_adapter_config(trainer.out_dir)["quantization"]["scheme"] == "nf4"
