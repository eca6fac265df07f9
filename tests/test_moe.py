"""Mixture-of-Experts: dispatch against a per-token reference, the balance loss, training, checkpoints."""

import json
import math

import pytest
import torch

import checkpoint
from configs import ModelConfig, get_config
from hf import to_transformers
from model import GPT, MLP
from moe import MoE, collect_moe_stats, load_balancing_loss
from tests.helpers import TINY_MODEL, crash_during_step, make_trainer

MOE = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, hidden_dim=48)


def moe_layer(seed=0, **overrides) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(ModelConfig(**{**TINY_MODEL, **MOE, **overrides}), MLP)
    for p in layer.parameters():  # larger weights than the model's init, so differences show
        torch.nn.init.normal_(p, std=0.3)
    return layer


def reference_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer written one token and one assignment at a time, capacity counted as it goes."""
    c = layer.config
    tokens = x.reshape(-1, x.shape[-1])
    k, n_experts = c.num_experts_per_tok, c.n_routed_experts
    capacity = math.ceil(c.capacity_factor * len(tokens) * k / n_experts) if c.capacity_factor else None
    taken = [0] * n_experts
    out = []
    for t in tokens:
        probs = torch.softmax(t @ layer.router.weight.T, dim=-1)
        top = sorted(range(n_experts), key=lambda e: -probs[e].item())[:k]
        norm = sum(probs[e] for e in top) if c.norm_topk_prob and k > 1 else 1.0
        y = sum(shared(t) for shared in layer.shared_experts) if c.n_shared_experts else torch.zeros_like(t)
        for e in top:
            if capacity is None or taken[e] < capacity:
                y = y + probs[e] / norm * layer.experts[e](t)
            taken[e] += 1
        out.append(y)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("config", [
    dict(),
    dict(norm_topk_prob=False, n_shared_experts=0),
    dict(num_experts_per_tok=1, n_routed_experts=3),
    dict(num_experts_per_tok=4, n_shared_experts=2),
    dict(capacity_factor=0.5),  # drops assignments
    dict(capacity_factor=1.0),
])
def test_dispatch_matches_per_token_reference(config):
    layer = moe_layer(**config).eval()
    x = torch.randn(3, 7, TINY_MODEL["dim"])
    with torch.no_grad():
        got, expected = layer(x), reference_moe(layer, x)
    assert (got - expected).abs().max().item() < 1e-5


def test_gradients_reach_every_expert_that_got_tokens():
    layer = moe_layer()
    with torch.no_grad():
        layer.router.weight[3] = -1.0  # positive inputs: expert 3 always scores lowest and gets no token
    x = torch.rand(2, 5, TINY_MODEL["dim"])
    with collect_moe_stats(layer) as stats:
        out = layer.train()(x)
    out.square().sum().backward()
    counts = stats.expert_counts[0]
    assert counts[3] == 0 and counts[:3].sum() == 2 * 5 * 2
    for e, expert in enumerate(layer.experts):
        for p in expert.parameters():
            assert p.grad is not None  # every expert runs (on zero tokens too), as DDP requires
            assert (p.grad.abs().sum() > 0) == (counts[e] > 0), e
    assert layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in layer.shared_experts.parameters())


def test_load_balancing_loss_matches_the_formula():
    torch.manual_seed(0)
    B, T, E, k = 3, 6, 4, 2
    scores = torch.randn(B * T, E).softmax(-1)
    experts = scores.topk(k, dim=-1).indices
    per_seq = []
    for b in range(B):
        rows = slice(b * T, (b + 1) * T)
        f = [(experts[rows] == e).sum().item() * E / (T * k) for e in range(E)]
        per_seq.append(sum(f[e] * scores[rows, e].mean().item() for e in range(E)))
    assert load_balancing_loss(scores, experts, B).item() == pytest.approx(sum(per_seq) / B, rel=1e-6)
    f = [(experts == e).sum().item() * E / (B * T * k) for e in range(E)]
    whole = sum(f[e] * scores[:, e].mean().item() for e in range(E))
    assert load_balancing_loss(scores, experts, 1).item() == pytest.approx(whole, rel=1e-6)
    # Perfect balance gives 1; everything on one expert gives E.
    uniform = torch.full((E, E), 1.0 / E)
    assert load_balancing_loss(uniform, torch.arange(E)[:, None], 1).item() == pytest.approx(1.0)
    collapsed = torch.eye(E)[[0] * E]
    assert load_balancing_loss(collapsed, torch.zeros(E, 1, dtype=torch.long), 1).item() == pytest.approx(E)


def test_aux_loss_only_while_training_and_only_for_the_collected_model():
    cfg = ModelConfig(vocab_size=64, **{**TINY_MODEL, **MOE})
    model, reference = GPT(cfg), GPT(cfg)
    idx = torch.randint(0, 64, (2, 8))
    with collect_moe_stats(model) as stats:
        model.eval()(idx)
        with torch.no_grad():
            model.train()(idx)
        reference.train()(idx)  # e.g. DPO's frozen reference model: not counted
    assert stats.aux_losses == [] and stats.expert_counts == []
    with collect_moe_stats(model) as stats:
        model.train()(idx)
        model(idx)  # two forward passes in one loss (e.g. chosen and rejected): both count
    assert len(stats.aux_losses) == 2 * cfg.n_layers
    assert stats.aux_loss().requires_grad and stats.aux_loss().item() >= 1.0 - 1e-6  # >= 1, = 1 if balanced
    shares = [v.item() for name, v in stats.metrics().items() if name.startswith("moe_share_e")]
    assert len(shares) == 4 and sum(shares) == pytest.approx(1.0)
    model(idx)  # outside the context nothing is kept
    assert all(m.stats is None for m in model.modules() if isinstance(m, MoE))


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(vocab_size=64, **{**TINY_MODEL, **MOE})
    torch.manual_seed(0)
    model = GPT(cfg).train()
    idx = torch.randint(0, 64, (2, 8))
    grads = []
    for use_checkpoint in (False, True):
        model.grad_checkpoint = use_checkpoint
        model.zero_grad()
        with collect_moe_stats(model) as stats:
            loss = model(idx).square().mean()
        (loss + 0.5 * stats.aux_loss()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_parameter_counts_and_presets():
    cfg = ModelConfig(vocab_size=64, **{**TINY_MODEL, **MOE})
    model = GPT(cfg)
    expert = 3 * cfg.dim * cfg.hidden_dim
    assert model.num_params() - model.num_active_params() == cfg.n_layers * (4 - 2) * expert
    dense = GPT(ModelConfig(vocab_size=64, **{**TINY_MODEL, "hidden_dim": 3 * 48}))
    router = cfg.n_layers * cfg.dim * 4
    assert model.num_active_params() == dense.num_params() + router  # 1 shared + 2 routed of 48 = 144 wide
    tiny, tiny_moe = GPT(get_config("tiny")), GPT(get_config("tiny-moe"))
    c, m = tiny.config, tiny_moe.config  # per layer: 3 active experts of m.hidden_dim, a router, against a SwiGLU
    assert tiny_moe.num_active_params() - tiny.num_params() == \
        c.n_layers * (3 * 3 * c.dim * m.hidden_dim + c.dim * m.n_routed_experts - 3 * c.dim * c.hidden_dim)
    assert "active per token" in tiny_moe.describe_size() and "active" not in tiny.describe_size()
    big = get_config("minimind2-moe")
    assert (big.dim, big.n_layers, big.n_shared_experts, big.n_routed_experts, big.num_experts_per_tok) == \
        (640, 8, 1, 4, 2)
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be between 1 and n_routed_experts=4"):
        ModelConfig(use_moe=True, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="capacity_factor must be >= 0"):
        ModelConfig(use_moe=True, capacity_factor=-1)


def test_generation_with_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, **{**TINY_MODEL, **MOE})).eval()
    out = model.generate(torch.randint(0, 64, (2, 5)), max_new_tokens=6, temperature=0.0)
    with torch.no_grad():
        full = model(out[:, :-1]).argmax(-1)[:, 4:]  # greedy choice at every generated position
    assert torch.equal(full, out[:, 5:])


def test_hf_interop_refuses_moe_models():
    with pytest.raises(ValueError, match="Mixture-of-Experts"):
        to_transformers(GPT(ModelConfig(vocab_size=64, **{**TINY_MODEL, **MOE})), "llama")


def moe_trainer(data_dir, out_dir, model=None, **train):
    return make_trainer(data_dir, out_dir, {**MOE, **(model or {})}, **{**dict(
        max_steps=8, eval_interval=4, eval_iters=1, log_interval=1, save_interval=4), **train})


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_adds_the_aux_loss_and_logs_expert_shares(data_dir, tmp_path):
    first = {}
    for alpha in (0.0, 1.0):
        out = tmp_path / f"alpha{alpha}"
        moe_trainer(data_dir, out, model={"aux_loss_alpha": alpha}, max_steps=1).train()
        first[alpha] = next(r for r in read_metrics(out) if r["split"] == "train")
    # Same seed, same weights, same batch: the loss differs by exactly alpha * aux.
    assert first[1.0]["loss"] - first[0.0]["loss"] == pytest.approx(first[1.0]["moe_aux_loss"], abs=1e-5)
    assert first[1.0]["moe_aux_loss"] >= 1.0 - 1e-6
    shares = [first[1.0][f"moe_share_e{e}"] for e in range(4)]
    assert sum(shares) == pytest.approx(1.0) and first[1.0]["moe_max_share"] >= max(shares)
    assert not any(k.startswith("moe_") for r in read_metrics(out) if r["split"] == "val" for k in r)


def test_moe_checkpoint_saves_resumes_and_loads(data_dir, tmp_path):
    expected = moe_trainer(data_dir, tmp_path / "whole").train()["val_loss"]

    crashing = moe_trainer(data_dir, tmp_path / "resumed")
    crash_during_step(crashing, 6, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    assert checkpoint.load_train_state(tmp_path / "resumed")["step"] == 4
    resumed = moe_trainer(data_dir, tmp_path / "resumed", resume=True)
    assert resumed.train()["val_loss"] == pytest.approx(expected, abs=1e-6)

    model = GPT.from_pretrained(tmp_path / "resumed").eval()
    assert model.config.use_moe and isinstance(model.layers[0].mlp, MoE)
    whole = GPT.from_pretrained(tmp_path / "whole").eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.allclose(model(idx), whole(idx), atol=1e-5)


def test_lora_wraps_the_expert_projections():
    from lora import LoRALinear, apply_lora, lora_layers

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, **{**TINY_MODEL, **MOE})).train()
    apply_lora(model, r=4)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for i in range(TINY_MODEL["n_layers"]):
        for group, n in (("experts", 4), ("shared_experts", 1)):
            for j in range(n):
                assert {f"layers.{i}.mlp.{group}.{j}.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= wrapped
    assert len(wrapped) == TINY_MODEL["n_layers"] * (4 + 3 * 5)  # attention + 3 per expert; not the router
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B)  # B starts at zero; make the update visible
    with collect_moe_stats(model) as stats:
        loss = model(torch.randint(0, 64, (2, 8))).square().mean()
    (loss + stats.aux_loss()).backward()
    counts = stats.expert_counts[0]
    for e, expert in enumerate(model.layers[0].mlp.experts):
        assert (expert.up_proj.lora_A.grad.abs().sum() > 0) == (counts[e] > 0)
