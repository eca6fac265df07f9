"""Generation: the KV-cache loop against plain full-sequence decoding, and the sampling filters."""

import torch

from configs import ModelConfig
from model import GPT
from sampling import filter_top_k, filter_top_p

SMALL = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)


def test_cached_greedy_generation_equals_uncached():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    prompt = torch.randint(0, 300, (2, 7))
    got = model.generate(prompt, max_new_tokens=20, temperature=0)
    idx = prompt
    with torch.no_grad():
        for _ in range(20):  # no cache: the whole sequence through the model at every step
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, idx)


def test_generation_stops_at_eos_and_at_the_context():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    prompt = torch.randint(0, 300, (1, 5))
    first = model.generate(prompt, max_new_tokens=1, temperature=0)[0, -1].item()
    assert model.generate(prompt, max_new_tokens=10, temperature=0, eos_id=first).shape[1] == 6
    long = model.generate(torch.randint(0, 300, (1, 60)), max_new_tokens=10, temperature=0)
    assert long.shape[1] == 48  # cut from the left to the context, nothing generated past it


def test_same_seed_same_sample():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    prompt = torch.randint(0, 300, (1, 5))
    runs = [model.generate(prompt, 15, temperature=1.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[True, True, False, False, False]]
    # 0.5 + 0.2 = 0.7 < 0.75, so the third token is needed; the rest are not.
    assert torch.isfinite(filter_top_p(logits, 0.75)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.5)).tolist() == [[True, False, False, False, False]]
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # the same distribution in another order
    assert torch.isfinite(filter_top_p(shuffled, 0.75)).tolist() == [[False, True, False, True, True]]
