"""LoRA: outputs and merged weights against peft on the same weights, merge/unmerge, frozen base,
adapter-only checkpoints, the merged export and the LoRA trainer."""

import copy
import json

import pytest
import torch

import checkpoint
import lora
from configs import LORA_TARGETS, LoRAConfig, ModelConfig
from model import GPT
from tests.helpers import SFT_MODEL, crash_during_step
from trainers import LoRATrainer

GQA_MODEL = {**SFT_MODEL, "dim": 32, "n_heads": 4, "n_kv_heads": 2}  # k/v projections are 32 -> 16: not square


def tiny_gpt(vocab_size: int = 96) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab_size, **GQA_MODEL)).eval()


def randomise_adapters(model):
    """B starts at zero (the model starts unchanged); give it values so the adapters do something."""
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.normal_(0, 0.2)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_merged_weights_match_peft(use_rslora):
    peft = pytest.importorskip("peft")
    ours, theirs = tiny_gpt(), tiny_gpt()
    counts = lora.apply_lora(ours, r=4, alpha=8, use_rslora=use_rslora)
    randomise_adapters(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=use_rslora,
                             target_modules=list(LORA_TARGETS))
    theirs = peft.inject_adapter_in_model(config, theirs)
    pairs = [(m, theirs.get_submodule(n)) for n, m in ours.named_modules() if isinstance(m, lora.LoRALinear)]
    assert len(pairs) == counts["wrapped"] == 7 * GQA_MODEL["n_layers"]
    with torch.no_grad():
        for mine, peft_layer in pairs:
            assert peft_layer.lora_A["default"].weight.shape == mine.lora_A.shape  # (r, in), also for k/v under GQA
            assert peft_layer.lora_B["default"].weight.shape == mine.lora_B.shape  # (out, r)
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B)
    idx = torch.randint(0, 96, (2, 12))
    assert torch.allclose(ours(idx), theirs(idx), atol=1e-5)
    for mine, peft_layer in pairs:
        mine.merge()
        peft_layer.merge()
        assert torch.allclose(mine.base.weight, peft_layer.base_layer.weight, atol=1e-6)


def set_merged(model, merged: bool):
    for layer in lora.lora_layers(model):
        layer.merge() if merged else layer.unmerge()


def test_starts_unchanged_and_merge_unmerge_round_trip():
    base = tiny_gpt()
    model = copy.deepcopy(base)
    lora.apply_lora(model, r=4, alpha=8)
    idx = torch.randint(0, 96, (2, 12))
    assert torch.equal(model(idx), base(idx))  # B = 0
    randomise_adapters(model)
    weights = {n: p.clone() for n, p in model.named_parameters() if ".base." in n}
    unmerged = model(idx)
    assert not torch.allclose(unmerged, base(idx), atol=1e-3)
    set_merged(model, True)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if ".base." in n)
    assert torch.allclose(model(idx), unmerged, atol=1e-5)
    set_merged(model, False)
    assert all(torch.allclose(p, weights[n], atol=1e-6) for n, p in model.named_parameters() if ".base." in n)
    assert torch.allclose(model(idx), unmerged, atol=1e-5)

    for merged in (False, True):  # adapters off: exactly the base model, whether merged or not
        set_merged(model, merged)
        with lora.adapters_disabled(model):
            assert torch.allclose(model(idx), base(idx), atol=1e-5)
        assert torch.allclose(model(idx), unmerged, atol=1e-5)
        assert all(layer.merged == merged for layer in lora.lora_layers(model))


def test_only_adapters_train_and_counts_are_right():
    model = tiny_gpt()
    model.train()
    counts = lora.apply_lora(model, targets=["k_proj", "v_proj", "down_proj"], r=3, alpha=3, dropout=0.1)
    wrapped = lora.lora_layers(model)
    assert counts["wrapped"] == len(wrapped) == 3 * GQA_MODEL["n_layers"]
    assert counts["trainable"] == sum(3 * (m.base.in_features + m.base.out_features) for m in wrapped)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    randomise_adapters(model)
    model(torch.randint(0, 96, (2, 12))).sum().backward()
    for name, p in model.named_parameters():
        is_adapter = ".lora_" in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) if is_adapter else p.grad is None, name
    with pytest.raises(ValueError, match="LoRA targets match no linear layer: qkv"):
        lora.apply_lora(tiny_gpt(), targets=["q_proj", "qkv"])
    # GPT-2's block has no gate_proj: the default targets take the six projections it has
    gpt2_like = GPT(ModelConfig(vocab_size=96, **{**GQA_MODEL, "mlp": "gelu", "norm": "layernorm"}))
    assert lora.apply_lora(gpt2_like)["wrapped"] == 6 * GQA_MODEL["n_layers"]
    with pytest.raises(ValueError, match="LoRA targets match no linear layer: gate_proj"):
        lora.apply_lora(GPT(ModelConfig(vocab_size=96, **{**GQA_MODEL, "mlp": "gelu"})), targets=["gate_proj"])


def lora_config(d, **kw) -> LoRAConfig:
    return LoRAConfig(**{**dict(data_dir=str(d), out_dir=str(d / "lora"), init_from=str(d / "pretrain"),
                                sft_data=str(d / "train.jsonl"), sft_val_data=str(d / "val.jsonl"), device="cpu",
                                batch_size=8, max_steps=8, warmup_steps=2, lr=1e-2, eval_iters=2, log_interval=4,
                                save_interval=4, eval_samples=0, lora_r=4), **kw})


def test_lora_trainer_saves_adapters_that_reload_resume_and_export(sft_dirs):
    trainer = LoRATrainer(lora_config(sft_dirs, max_steps=16), {})
    before = trainer.evaluate()["val_loss"]
    after = trainer.train()["val_loss"]
    assert after < before - 0.2
    out = sft_dirs / "lora"
    assert not (out / checkpoint.WEIGHTS).exists()
    saved = checkpoint.read_tensors(out / lora.ADAPTER_WEIGHTS)
    assert saved.keys() == lora.adapter_state(trainer.model).keys() and all(".lora_" in k for k in saved)
    config = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    assert config["base_checkpoint"] == str(sft_dirs / "pretrain") and config["base_step"] == 0 and config["r"] == 4

    model, tokenizer = lora.load_lora_checkpoint(out)
    trainer.model.eval()
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    assert torch.allclose(model(idx), trainer.model(idx), atol=1e-6)
    merged = GPT.from_pretrained(lora.export_merged(out, sft_dirs / "merged")).eval()
    assert torch.allclose(merged(idx), model(idx), atol=1e-5)
    with lora.adapters_disabled(model):
        assert torch.allclose(model(idx), GPT.from_pretrained(sft_dirs / "pretrain").eval()(idx), atol=1e-6)

    # An interrupted run resumes from its adapters to the same result as an uninterrupted one.
    whole = LoRATrainer(lora_config(sft_dirs, out_dir=str(sft_dirs / "whole")), {}).train()["val_loss"]
    crashing = LoRATrainer(lora_config(sft_dirs, out_dir=str(sft_dirs / "resumed")), {})
    crash_during_step(crashing, 6, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    resumed = LoRATrainer(lora_config(sft_dirs, out_dir=str(sft_dirs / "resumed"), resume=True, lora_r=16), {})
    assert resumed.step == 4 and resumed.lora_settings["r"] == 4  # the saved adapters' settings win
    assert resumed.train()["val_loss"] == pytest.approx(whole, abs=1e-6)

    # Adapters on a base that changed since are refused with one line.
    info = checkpoint.load_run_info(sft_dirs / "pretrain")
    checkpoint.write_json(sft_dirs / "pretrain" / "run.json", {**info, "step": 99})
    with pytest.raises(ValueError, match=r"trained on .*pretrain at step 0, but it is now at step 99"):
        lora.load_lora_checkpoint(out)


def test_bad_adapter_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing, so .* is not a LoRA checkpoint"):
        lora.load_lora_checkpoint(tmp_path)
    (tmp_path / lora.ADAPTER_CONFIG).write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match="field\\(s\\) missing: base_checkpoint, base_step, alpha, targets"):
        lora.load_lora_checkpoint(tmp_path)
