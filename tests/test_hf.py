"""Pretrained Hugging Face models in and out (hf.py, export.py), against transformers itself: logits within 1e-4
in float32 and the same KV-cache greedy generation for every family (GPT-2, Llama with Llama-3 and linear RoPE
scaling, Mistral, Qwen2, Qwen3), both config.json layouts, sharded and pickled weights, the export loaded back by
transformers, import -> export -> import bit for bit, the refusals, and SFT -> DPO -> demo on such a model."""

import json
import shutil

import pytest
import torch

import bench
import checkpoint
import demo
import export
import flops
import hf
import lora
from configs import LORA_TARGETS, DPOConfig, ModelConfig, SFTConfig, parse_train_args
from model import GPT
from pretrained import checkpoint_stage, load_pretrained
from tests.helpers import TINY_MODEL, make_chats, write_jsonl
from tests.hf_models import FAMILIES, TEXTS, fuzz_texts, make_model_dir
from tokenizer import Tokenizer
from trainers import DPOTrainer, SFTTrainer, run_stage

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (its directory, the transformers model in it); Qwen2 with unused vocabulary rows, as Qwen has."""
    root = tmp_path_factory.mktemp("hf")
    return {family: (root / family, make_model_dir(family, root / family, extra_vocab=9 if family == "qwen2" else 0))
            for family in FAMILIES}


def max_diff(ours: GPT, theirs, idx) -> float:
    with torch.no_grad():
        return (ours.eval()(idx) - theirs(idx).logits).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_dirs, family):
    directory, theirs = hf_dirs[family]
    ours = GPT.from_pretrained(directory)
    assert ours.config.hf_model_type == theirs.config.model_type
    for length in (ours.config.max_seq_len, 7):  # the whole context (Mistral's: its sliding window) and a few
        idx = torch.randint(0, theirs.config.vocab_size, (2, length))
        assert max_diff(ours, theirs, idx) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_greedy_generation_matches_transformers(hf_dirs, family):
    directory, theirs = hf_dirs[family]
    ours = GPT.from_pretrained(directory).eval()
    prompt = torch.randint(0, theirs.config.vocab_size, (1, 6))
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 16, temperature=0), expected)


def test_left_padded_rows_take_their_positions_from_the_mask(hf_dirs):
    directory, theirs = hf_dirs["gpt2"]  # learned absolute positions: padding must not shift them
    ours = GPT.from_pretrained(directory).eval()
    idx = torch.randint(0, theirs.config.vocab_size, (2, 10))
    mask = torch.ones_like(idx)
    mask[1, :4] = 0
    with torch.no_grad():
        got = ours(idx, attention_mask=mask)
        expected = theirs(idx, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_training_steps_match_transformers_in_bench(hf_dirs, family):
    """bench.py --checkpoint: the same loss as the model's transformers class before and after an AdamW step."""
    cfg = bench.BenchConfig(checkpoint=str(hf_dirs[family][0]), vocab_size=hf_dirs[family][1].config.vocab_size,
                            batch_size=2, seq_len=16, device="cpu", compile="false")
    runners = bench.build_runners(cfg, torch.device("cpu"), torch.float32)
    assert type(runners["hf"].model) is type(hf_dirs[family][1])
    batch = bench.make_batch("sft", cfg, torch.device("cpu"))
    for _ in range(2):
        ours, theirs = (r.train_step("sft", batch).item() for r in runners.values())
        assert ours == pytest.approx(theirs, abs=1e-5)
    assert flops.matmul_params(runners["ours"].model.config) == sum(
        w.numel() for w in bench.weight_matrices(runners["ours"].model, fused=True)) - 32 * (
        runners["ours"].model.lm_head.weight.shape[0] - cfg.vocab_size)


def test_both_config_layouts_give_the_same_model(hf_dirs, tmp_path):
    directory, _ = hf_dirs["llama3"]
    new = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" in new  # transformers 5's layout
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rope = dict(new["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}  # as older files spell it
    config = hf.config_from_hf(old, "old")
    assert config == hf.read_hf_config(directory)
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_theta == 500000.0


def test_sharded_safetensors_and_pytorch_bin_load_the_same_weights(hf_dirs, tmp_path):
    directory, theirs = hf_dirs["qwen2"]
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    shutil.copy(directory / "config.json", tmp_path / "bin")
    torch.save(theirs.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    reference = GPT.from_pretrained(directory).state_dict()
    for variant in ("sharded", "bin"):
        state = GPT.from_pretrained(tmp_path / variant).state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_and_round_trips_bit_for_bit(hf_dirs, family, tmp_path):
    directory, _ = hf_dirs[family]
    export.main(["--checkpoint", str(directory), "--out", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == FAMILIES[family][0].removesuffix("Config").lower()
    first, again = GPT.from_pretrained(directory), GPT.from_pretrained(tmp_path / "out")
    assert first.config == again.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert max_diff(first, theirs, torch.randint(0, first.config.vocab_size, (2, 24))) < 1e-4
    ours_tok = Tokenizer.from_pretrained(directory)
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS + fuzz_texts(100):
        assert their_tok(text, add_special_tokens=False)["input_ids"] == ours_tok.encode(text, allow_special=True)
    stop = json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"]
    assert ours_tok.im_end_id in stop and ours_tok.eot_id in stop


def test_our_preset_exports_as_llama_and_a_lora_checkpoint_merged(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **TINY_MODEL))
    checkpoint.save_checkpoint(tmp_path / "base", model, tokenizer, {"stage": "sft", "step": 3})
    lora.apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.normal_(0, 0.2)
    lora.save_lora_checkpoint(tmp_path / "lora", model, tokenizer, tmp_path / "base",
                              {"r": 4, "alpha": 8, "dropout": 0.0, "use_rslora": False,
                               "targets": list(LORA_TARGETS)}, {"stage": "lora", "step": 1})
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    for source, expected in (("base", GPT.from_pretrained(tmp_path / "base")), ("lora", model)):
        export.main(["--checkpoint", str(tmp_path / source), "--out", str(tmp_path / f"hf-{source}")])
        assert json.loads((tmp_path / f"hf-{source}" / "config.json").read_text())["model_type"] == "llama"
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"hf-{source}").eval()
        assert max_diff(expected, theirs, idx) < 1e-4


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(model_type="gemma"), "model_type 'gemma' is not supported; supported: llama, mistral"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "RoPE scaling 'yarn' is not supported; supported: none, linear, llama3"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (lambda c: c.update(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False is not"),
])
def test_unsupported_configs_are_refused_in_one_line(hf_dirs, tmp_path, change, message):
    shutil.copytree(hf_dirs["llama"][0], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    change(config)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.norm.weight"), r"missing: norm.weight \(1\)"),
    (lambda s: s.update({"model.extra.weight": torch.zeros(2)}), r"unexpected: model.extra.weight \(1\)"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(3)}), r"shape mismatch: norm.weight \(3,\) vs model"),
])
def test_every_weight_is_checked_by_name_and_shape(hf_dirs, tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dirs["llama"][0], tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(tmp_path / "m")


def test_moe_export_and_offline_hub_names_are_refused(tokenizer, tmp_path, monkeypatch):
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, use_moe=True, **TINY_MODEL))
    with pytest.raises(ValueError, match="Mixture-of-Experts"):
        hf.export(model, tokenizer, tmp_path / "moe")
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConnectionError, match="no network here.*pass the directory DIR instead"):
        GPT.from_pretrained("hf:Qwen/Qwen2.5-0.5B-Instruct")


def test_a_base_model_gets_chatml_tokens_and_mean_rows(hf_dirs):
    directory, theirs = hf_dirs["gpt2"]
    messages = []
    model, tokenizer = load_pretrained(directory, log=messages.append)
    old = theirs.config.vocab_size
    assert (tokenizer.im_start_id, tokenizer.im_end_id, model.config.vocab_size) == (old, old + 1, old + 2)
    assert "ChatML is added" in messages[0] and f"from {old} to {old + 2} rows" in messages[0]
    mean = theirs.transformer.wte.weight[:old].mean(0)
    assert torch.allclose(model.embed.weight[old:old + 2], mean.expand(2, -1))
    idx = torch.randint(0, old, (1, 10))
    with torch.no_grad():  # the old tokens' logits are unchanged
        assert (model.eval()(idx)[..., :old] - theirs(idx).logits).abs().max() < 1e-4
    assert checkpoint_stage(directory) == "pretrain"  # a base model: the demo continues text


def test_sft_then_dpo_then_demo_on_a_hf_model(hf_dirs, tmp_path, capsys):
    directory, _ = hf_dirs["qwen2"]
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, *c["conversations"]]} for c in make_chats(24, 0)]
    write_jsonl(tmp_path / "chats.jsonl", chats)
    common = ["--device", "cpu", "--compile", "false", "--batch_size", "4", "--max_steps", "3", "--warmup_steps", "1",
              "--log_interval", "1", "--eval_iters", "1"]
    run_stage(SFTTrainer, *parse_train_args(SFTConfig, [
        "--init_from", str(directory), "--out_dir", str(tmp_path / "sft"), "--sft_data", str(tmp_path / "chats.jsonl"),
        "--sft_val_data", str(tmp_path / "chats.jsonl"), "--eval_samples", "2", "--max_new_tokens", "3", *common]))
    assert (tmp_path / "sft" / "tokenizer.json").exists()
    assert checkpoint.load_run_info(tmp_path / "sft")["init_from"] == str(directory)
    pairs = [{"prompt": "Tom has a ball. What is it?", "chosen": "The ball.", "rejected": "A cat."}] * 8
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run_stage(DPOTrainer, *parse_train_args(DPOConfig, [
        "--init_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "dpo"), "--train_file",
        str(tmp_path / "pairs.jsonl"), "--val_file", str(tmp_path / "pairs.jsonl"), "--eval_samples", "0",
        "--seq_len", "128", *common]))  # the tiny model's context (DPO's default of 256 is refused as longer)
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # finite, not NaN
    capsys.readouterr()
    demo.main(["--checkpoint", str(tmp_path / "dpo"), "--prompt", "Tom has a ball. What is it?", "--max_new_tokens",
               "4", "--device", "cpu", "--compile", "false", "--output_dir", str(tmp_path / "demo"), "--seed", "0"])
    turn = json.loads(next((tmp_path / "demo").glob("*/turns.jsonl")).read_text())
    assert turn["mode"] == "chat" and turn["stage"] == "dpo" and turn["reply_tokens"] <= 4
    assert capsys.readouterr().out.strip() == turn["reply"].strip()
    # And the result exports for transformers.
    export.main(["--checkpoint", str(tmp_path / "dpo"), "--out", str(tmp_path / "hf-dpo")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-dpo").eval()
    assert max_diff(GPT.from_pretrained(tmp_path / "dpo"), theirs, torch.randint(0, 100, (1, 12))) < 1e-4
