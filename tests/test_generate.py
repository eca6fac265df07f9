"""Generation: the KV-cache loop against plain full-sequence decoding, and the sampling filters."""

import pytest
import torch

from attention import KVCache
from configs import ModelConfig
from model import GPT
from sampling import apply_repetition_penalty, filter_top_k, filter_top_p, sample_next
from tests.helpers import SMALL


def uncached_greedy(model, idx, steps):
    """nanoGPT's loop: the whole sequence (cropped to the context) through the model at every step."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(idx[:, -model.config.max_seq_len:])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def test_cached_greedy_generation_equals_uncached():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    prompt = torch.randint(0, 300, (2, 7))
    assert torch.equal(model.generate(prompt, max_new_tokens=20, temperature=0), uncached_greedy(model, prompt, 20))


def test_generation_past_the_context_slides_like_the_uncached_crop():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    for length in (40, 60):  # fills the context while generating; longer than the context from the start
        prompt = torch.randint(0, 300, (1, length))
        got = model.generate(prompt, max_new_tokens=15, temperature=0)
        assert got.shape[1] == length + 15 and torch.equal(got[:, :length], prompt)  # the prompt is returned whole
        assert torch.equal(got, uncached_greedy(model, prompt, 15))


def test_generation_stops_at_eos():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    prompt = torch.randint(0, 300, (1, 5))
    first = model.generate(prompt, max_new_tokens=1, temperature=0)[0, -1].item()
    assert model.generate(prompt, max_new_tokens=10, temperature=0, eos_id=first).shape[1] == 6
    assert model.generate(prompt, max_new_tokens=10, temperature=0, eos_id=[7, first]).shape[1] == 6
    assert model.generate(prompt, max_new_tokens=10, temperature=0).shape[1] == 15


def test_rows_that_stop_early_are_dropped_and_the_others_generate_as_before(monkeypatch):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    with torch.no_grad():  # large weights: varied tokens, which a misplaced cache row would change
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    prompt = torch.randint(0, 300, (8, 5))
    free = model.generate(prompt, 12, temperature=0)[:, 5:]
    stops = free[:6, 1].unique().tolist()  # six of the eight rows stop by their second token: the batch shrinks
    kept = []
    monkeypatch.setattr(KVCache, "keep_rows", lambda cache, keep, original=KVCache.keep_rows: (
        kept.append(int(keep.sum())), original(cache, keep)))
    got = model.generate(prompt, 12, temperature=0, eos_id=stops)[:, 5:]
    ends = []
    for row in range(8):
        hits = [i for i, t in enumerate(free[row].tolist()) if t in stops]
        ends.append(hits[0] + 1 if hits else 12)
        assert torch.equal(got[row, :ends[-1]], free[row, :ends[-1]])  # what it would generate in the whole batch
        assert set(got[row, ends[-1]:].tolist()) <= {stops[0]}  # then only eos
    assert kept and kept[0] < 8 and max(ends) > 3  # rows were dropped, and the others went on


def test_several_samples_of_a_prompt_read_it_once_and_sample_as_separate_rows():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    prompts = torch.randint(0, 300, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    generator = torch.Generator().manual_seed(1)
    shared = model.generate(prompts, 5, temperature=1.0, attention_mask=mask, num_samples=3, generator=generator)
    generator.manual_seed(1)
    repeated = model.generate(prompts.repeat_interleave(3, 0), 5, temperature=1.0,
                              attention_mask=mask.repeat_interleave(3, 0), generator=generator)
    assert torch.equal(shared, repeated)  # the same draws from the same distributions, prompt read once
    assert len({tuple(row) for row in shared[:3, 7:].tolist()}) > 1  # the three samples of a prompt differ


def test_stream_yields_the_same_tokens_one_at_a_time():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    prompt = torch.randint(0, 300, (2, 6))
    steps = list(model.generate_stream(prompt, 12, temperature=0.8, top_k=50,
                                       generator=torch.Generator().manual_seed(3)))
    assert len(steps) == 12 and all(s.shape == (2, 1) and s.dtype == torch.long for s in steps)
    whole = model.generate(prompt, 12, temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([prompt, *steps], dim=1), whole)


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
    assert torch.isfinite(filter_top_p(logits, 0.0)).tolist() == [[True, False, False, False, False]]
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # the same distribution in another order
    assert torch.isfinite(filter_top_p(shuffled, 0.75)).tolist() == [[False, True, False, True, True]]


def test_sampling_draws_only_kept_tokens_in_proportion():
    logits = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).log().expand(4000, 5)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_k=3, top_p=0.6, generator=g).flatten()
    # top-k keeps 0.5, 0.2, 0.15; of those renormalised (0.59, 0.24, 0.18) top-p 0.6 keeps the first two
    counts = torch.bincount(draws, minlength=5).float() / len(draws)
    assert counts[2:].sum() == 0
    assert abs(counts[0] - 0.5 / 0.7) < 0.03
    assert torch.equal(sample_next(logits[:2], temperature=0), torch.zeros(2, 1, dtype=torch.long))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    got = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert got.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    with torch.no_grad():  # large weights, so that what a token attends to (padding or not) shows in the output
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    short, long = torch.randint(1, 300, (1, 4)), torch.randint(1, 300, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1), long])
    mask = torch.tensor([[0] * 5 + [1] * 4, [1] * 9])
    got = model.generate(batch, 12, temperature=0, attention_mask=mask)[:, 9:]
    assert torch.equal(got[0], model.generate(short, 12, temperature=0)[0, 4:])
    assert torch.equal(got[1], model.generate(long, 12, temperature=0)[0, 9:])


def test_compiled_decoding_matches_eager_decoding():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    prompt = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # a left-padded row
    expected = [model.generate(prompt, max_new_tokens=12, temperature=0, attention_mask=m) for m in (None, mask)]
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model(prompt, cache=cache)
        eager_logits = model(prompt[:, -1:], cache=cache)
    assert model.compile_decoding() is True
    compiled, calls = model.decode_step.compiled, []
    model.decode_step.compiled = lambda *args, **kwargs: calls.append(1) or compiled(*args, **kwargs)
    for m, want in zip((None, mask), expected):
        assert torch.equal(model.generate(prompt, max_new_tokens=12, temperature=0, attention_mask=m), want)
    assert len(calls) == 2 * 11  # every token after the first came from the compiled step
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model(prompt, cache=cache)
        torch.testing.assert_close(compiled(prompt[:, -1:], cache=cache), eager_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("failing_call", [1, 5])  # in the warm-up, or later (a recompile for another shape)
def test_failed_decode_compile_falls_back_to_eager_decoding(monkeypatch, failing_call):
    calls = {"n": 0}

    def fake_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls["n"] += 1
            if calls["n"] >= failing_call:
                raise RuntimeError("InductorError: no working C++ compiler\nlong details")
            return fn(*args, **kw)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    prompt = torch.randint(0, 300, (2, 5))
    want = model.generate(prompt, max_new_tokens=6, temperature=0)
    messages = []
    assert model.compile_decoding(log=messages.append) is (failing_call > 1)  # the warm-up makes one call
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0), want)
    assert messages == ["torch.compile failed (RuntimeError: InductorError: no working C++ compiler); decoding eagerly"]
    assert not model.decode_step.is_compiled and calls["n"] == failing_call
