"""bench.py's pieces on a tiny shape: FLOPs against a hand count, the step functions, the CLI end to end."""

import json
import subprocess
import sys

import pytest
import torch

import bench
import flops
from configs import ModelConfig, get_config
from model import GPT
from tests.helpers import TINY_MODEL


def test_flops_per_token_matches_a_hand_count():
    c = ModelConfig(vocab_size=320, **TINY_MODEL)  # dim 32, 2 layers, 2 heads of 16, 1 kv head, hidden 128
    per_layer = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 128  # q, k, v, o, gate/up/down
    n = 2 * per_layer + 32 * 320  # + the output head (real vocabulary)
    assert flops.matmul_params(c) == n == 40960
    assert flops.train_flops_per_token(c, seq_len=32) == 6 * n + 12 * 2 * 32 * 32
    # Independently: the model's own Linear weights, the head cut to the real vocabulary.
    model = GPT(c)
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert flops.matmul_params(c) == linear + c.dim * c.vocab_size


@pytest.mark.parametrize("part", ["pretrain", "sft", "dpo", "dpo_pre"])
def test_train_steps_match_hf_llama(part):
    cfg = bench.BenchConfig(preset="tiny", vocab_size=320, batch_size=2, seq_len=16, device="cpu", compile="false")
    runners = bench.build_runners(cfg, torch.device("cpu"), torch.float32)
    batch = bench.make_batch(part, cfg, torch.device("cpu"))
    losses = [[r.train_step(part, batch).item() for r in runners.values()] for _ in range(2)]
    for ours, hf in losses:  # the same loss before and after one optimizer step of each
        assert ours == pytest.approx(hf, abs=1e-5)
    assert losses[1][0] != pytest.approx(losses[0][0], abs=1e-6)  # the step changed the model


@pytest.mark.parametrize("moe", [False, True])
def test_matvec_floor_and_fused_weights_cover_every_matmul(moe):
    # The head is padded to 320 rows; with MoE a token visits the shared and its top-k experts and the router.
    model = GPT(ModelConfig(vocab_size=300, **TINY_MODEL, use_moe=moe))
    for fused in (False, True):
        mats = bench.weight_matrices(model, fused)
        assert sum(w.numel() for w in mats) == flops.matmul_params(model.config) + 32 * (320 - 300)
        bench.matvec_pass(model, 2, torch.device("cpu"), fused)()  # every input matches its matrix


def test_cli_writes_json(tmp_path):
    out = tmp_path / "b.json"
    result = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--vocab_size", "320", "--batch_size",
                             "1", "--seq_len", "16", "--parts", "pretrain,generate", "--memory", "false", "--warmup",
                             "0", "--steps", "1", "--new_tokens", "4", "--prompt_len", "4", "--peak_tflops", "1",
                             "--device", "cpu", "--out", str(out)], check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert report["peak_source"] == "--peak_tflops"
    train = report["train"]["pretrain"]
    assert set(train) == {"ours", "hf"}
    for r in train.values():  # MFU = FLOPs per token x tokens/s over the given peak of 1 TFLOPS
        assert r["mfu"] == pytest.approx(report["train_flops_per_token"] * r["tok_s"] / 1e12)
    # The table printed is the report written.
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    assert rows["pretrain"][1:3] == [f"{train['ours']['tok_s']:.0f}", f"{train['hf']['tok_s']:.0f}"]
    assert rows["decode"][1:3] == [f"{report['generate'][k]['decode_tok_s']:.0f}" for k in ("ours", "hf")]


def test_quantized_decoding_reports_its_weight_bytes(tmp_path):
    cfg = bench.BenchConfig(preset="tiny", vocab_size=320, parts="generate", hf=False, memory=False, warmup=0, steps=1,
                            new_tokens=4, prompt_len=4, peak_tflops=1, device="cpu", compile="false",
                            quantize="int8,nf4", out=str(tmp_path / "b.json"))
    report = bench.main(cfg)["generate"]
    float_matrices = bench.weight_matrices(GPT(get_config("tiny", vocab_size=320)), fused=False)
    assert report["ours"]["weight_bytes_per_token"] == sum(4 * w.numel() for w in float_matrices)
    *body, head = float_matrices  # the (tied) output head is quantised too, to float16
    # int8: a byte a weight and a float32 scale a row
    assert report["ours_int8"]["weight_bytes_per_token"] == sum(w.numel() + 4 * w.shape[0] for w in body) + \
        2 * head.numel()
    # nf4: half a byte a weight and a float32 absmax per block of 64
    assert report["ours_nf4"]["weight_bytes_per_token"] == sum(w.numel() // 2 + 4 * w.numel() // 64 for w in body) + \
        2 * head.numel()
    for k in ("ours", "ours_int8", "ours_nf4"):
        assert report[k]["decode_vs_ours"] == pytest.approx(report[k]["decode_tok_s"] / report["ours"]["decode_tok_s"])
    assert (report["ours"]["quantize"], report["ours_int8"]["quantize"]) == ("float32", "int8")
    with pytest.raises(ValueError, match="--quantize must be comma-separated names of int8, nf4, fp16, bf16, got "
                                         "int8,int4"):
        bench.BenchConfig(quantize="int8,int4")
