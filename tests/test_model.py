"""The model against independent references: HF transformers' Llama, and its own two attention paths."""

import dataclasses

import pytest
import torch

from attention import apply_rope, manual_attention, precompute_rope, sdpa_attention
from configs import ModelConfig, get_config
from hf import to_transformers
from model import GPT
from tests.helpers import SMALL


def small_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**SMALL, **overrides})).eval()


@pytest.mark.parametrize("shape", [
    dict(),                                               # GQA, tied embeddings
    dict(n_kv_heads=4, tie_embeddings=False),             # plain MHA, untied
    dict(n_heads=8, n_kv_heads=1, dim=128, n_layers=3),   # multi-query attention
    dict(vocab_size=1000, rope_theta=1e4, hidden_dim=96),  # vocabulary padded to 1024 inside our model
])
def test_matches_hf_llama(shape):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**{**SMALL, **shape})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False)).eval()
    # Random norm weights too, so a swapped norm would show.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours = GPT.from_transformers(hf).eval()
    assert ours.config.hidden_dim == cfg.hidden_dim and ours.config.n_kv_heads == cfg.n_kv_heads
    for T in (cfg.max_seq_len, 7):  # full context and a shorter sequence
        idx = torch.randint(0, cfg.vocab_size, (2, T))
        with torch.no_grad():
            expected = hf(idx).logits
            got = ours(idx)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-4

    # And back: our weights in a fresh HF model give the same logits again.
    back = to_transformers(ours, "llama").eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max().item() < 1e-4


def test_manual_and_sdpa_attention_agree_in_outputs_and_gradients():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 10, 16, requires_grad=True)
    k = torch.randn(2, 2, 10, 16, requires_grad=True)
    v = torch.randn(2, 2, 10, 16, requires_grad=True)
    padding = torch.ones(2, 10, dtype=torch.long)
    padding[1, :3] = 0  # left padding in the second row
    from attention import build_attention_mask

    for mask in (None, build_attention_mask(10, 10, "cpu", key_padding=padding)):
        outs, grads = [], []
        for attend in (manual_attention, sdpa_attention):
            out = attend(q, k, v, mask, 0.0)
            (g,) = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(), [q])
            outs.append(out)
            grads.append(g)
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
        assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_models_with_either_attention_agree():
    a = small_model(attn_impl="manual")
    b = small_model(attn_impl="sdpa")
    idx = torch.randint(0, 300, (2, 16))
    la, lb = a(idx), b(idx)
    assert torch.allclose(la, lb, atol=1e-5)
    la.sum().backward()
    lb.sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


def test_causality_future_tokens_do_not_change_past_logits():
    model = small_model()
    idx = torch.randint(0, 300, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 300
    with torch.no_grad():
        assert torch.allclose(model(idx)[:, :8], model(changed)[:, :8], atol=1e-6)
        assert not torch.allclose(model(idx)[:, 8:], model(changed)[:, 8:], atol=1e-3)


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_kv_cache_gives_the_logits_of_a_full_forward(attn_impl):
    model = small_model(attn_impl=attn_impl)
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(batch_size=2)
        parts = [model(idx[:, :8], cache=cache)]  # prefill the prompt once
        parts.append(model(idx[:, 8:11], cache=cache))  # a chunk of several tokens
        parts += [model(idx[:, t:t + 1], cache=cache) for t in range(11, 20)]  # then one at a time
    assert cache.pos == 20
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


def test_padding_mask_makes_left_padded_rows_match_unpadded():
    model = small_model()
    idx = torch.randint(1, 300, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), idx], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], dim=1).long()
    with torch.no_grad():
        plain = model(idx)
        # With left padding the positions shift by 4; RoPE is relative, so the scores do not change.
        masked = model(padded, attention_mask=mask)[:, 4:]
    assert torch.allclose(plain, masked, atol=1e-5)


def test_segment_ids_keep_packed_documents_apart():
    model = small_model()
    a, b = torch.randint(0, 300, (1, 6)), torch.randint(0, 300, (1, 5))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 6 + [1] * 5])
    with torch.no_grad():
        out = model(packed, segment_ids=segments)
        assert torch.allclose(out[:, :6], model(a), atol=1e-5)
        assert torch.allclose(out[:, 6:], model(b), atol=1e-5)


def test_rope_rotates_pairs_by_position():
    cos, sin = precompute_rope(head_dim=8, max_seq_len=5, theta=10000.0)
    x = torch.randn(1, 1, 5, 8)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y[..., 0, :], x[..., 0, :])  # position 0 is not rotated
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # rotations keep length
    # Channel 0 pairs with channel 4 (rotate-half), turning by angle = position at frequency 1.
    angle = torch.tensor(3.0)
    expected0 = x[0, 0, 3, 0] * angle.cos() - x[0, 0, 3, 4] * angle.sin()
    assert torch.allclose(y[0, 0, 3, 0], expected0, atol=1e-5)


def test_init_scales_residual_projections_and_optimizer_groups():
    model = GPT(get_config("tiny", vocab_size=512))
    std_q = model.layers[0].attn.q_proj.weight.std().item()
    std_o = model.layers[0].attn.o_proj.weight.std().item()
    assert abs(std_q - 0.02) < 0.002
    assert abs(std_o - 0.02 / (2 * model.config.n_layers) ** 0.5) < 0.001
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_presets_have_published_sizes():
    assert 25e6 < GPT(get_config("minimind2-small")).num_params() < 27e6
    cfg = get_config("minimind2")
    assert (cfg.dim, cfg.n_layers, cfg.hidden_dim) == (768, 16, 2048)
    assert get_config("minimind2-small").hidden_dim == 1408


@pytest.mark.parametrize("bad, message", [
    (dict(dim=100, n_heads=8), "not divisible by n_heads"),
    (dict(n_heads=8, n_kv_heads=3), "must divide n_heads"),
    (dict(attn_impl="flash"), "attn_impl"),
])
def test_bad_config_gives_one_line_error(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, **bad})


def test_too_long_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        small_model()(torch.zeros(1, SMALL["max_seq_len"] + 1, dtype=torch.long))


def test_config_fields_survive_a_dict_round_trip():
    cfg = get_config("tiny")
    assert ModelConfig(**dataclasses.asdict(cfg)) == cfg
