"""engine.py and GPT.forward(positions=...): continuous batching must generate what each request generates alone."""

import pytest
import torch

from configs import ModelConfig
from engine import Engine, QueueFull, SamplingParams, Sequence
from model import GPT
from tests.helpers import TINY_MODEL

VOCAB = 320


def make_model(attn_impl="sdpa", max_seq_len=64) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, **{**TINY_MODEL, "max_seq_len": max_seq_len}, attn_impl=attn_impl)
    model = GPT(config).eval()
    with torch.no_grad():  # weights 10x the initial scale: attention, not only the newest token, picks the next one
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(10)
    return model


def prompts(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_rows_at_their_own_positions_match_separate_forwards(attn_impl):
    """A right-padded prefill of prompts of different lengths, then decode steps with every row at its own
    position, give each row the logits of a plain forward over that row's sequence alone."""
    model = make_model(attn_impl)
    seqs = prompts([5, 11, 2])
    cache = model.new_kv_cache(3)
    ids = torch.zeros(3, 11, dtype=torch.long)
    for row, p in enumerate(seqs):
        ids[row, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        logits = model(ids, cache=cache, positions=torch.arange(11).expand(3, 11))
        for row, p in enumerate(seqs):
            alone = model(torch.tensor([p]))[0]
            torch.testing.assert_close(logits[row, :len(p)], alone, atol=1e-5, rtol=1e-5)
        for _ in range(4):  # decode: each row feeds one new token at its own next position
            new = prompts([1, 1, 1], seed=len(seqs[0]))
            positions = torch.tensor([[len(p)] for p in seqs])
            seqs = [p + t for p, t in zip(seqs, new)]
            logits = model(torch.tensor(new), cache=cache, positions=positions)
            assert cache.pos == 0  # the shared position is left alone
            for row, p in enumerate(seqs):
                torch.testing.assert_close(logits[row, 0], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=1e-5)


def alone(model, prompt, max_tokens, **sampling) -> list[int]:
    """The reference: GPT.generate on this prompt only (batch 1, its own KV cache)."""
    out = model.generate(torch.tensor([prompt]), max_tokens, **sampling)
    return out[0, len(prompt):].tolist()


def run_until_done(engine, seqs, steps_before: dict[int, int]):
    """Step the engine; sequence i is submitted just before step steps_before[i]."""
    step = 0
    while step < 1000 and (any(s.finish_reason is None for s in seqs)):
        for i, seq in enumerate(seqs):
            if steps_before[i] == step:
                engine.submit(seq)
        engine.step()
        step += 1
    engine.step()  # let the last ones leave
    assert engine.active == [] and not engine.waiting


def test_batched_greedy_generation_equals_one_at_a_time():
    """Requests of different lengths join at different steps (more than there are slots, so some wait),
    one is cancelled half-way (its row is refilled by the last active one); every other request's greedy
    tokens equal its generation alone."""
    model = make_model()
    engine = Engine(model, max_batch=3)
    ps = prompts([3, 17, 8, 1, 30, 12])
    max_tokens = [20, 9, 25, 14, 34, 6]  # 30 + 34 = the whole 64-token context
    seqs = [Sequence(p, SamplingParams(max_tokens=m, temperature=0)) for p, m in zip(ps, max_tokens)]
    starts = {0: 0, 1: 0, 2: 2, 3: 5, 4: 5, 5: 11}
    step = 0
    while any(s.finish_reason is None for s in seqs):
        for i, seq in enumerate(seqs):
            if starts[i] == step:
                engine.submit(seq)
        if step == 7:
            engine.cancel(seqs[0])  # row 0 is freed; the last active row moves into it
        engine.step()
        step += 1
    engine.step()
    assert engine.active == [] and not engine.waiting
    assert seqs[0].finish_reason == "cancelled" and 0 < len(seqs[0].tokens) < 20
    for seq, m in zip(seqs[1:], max_tokens[1:]):
        assert seq.finish_reason == "length" and len(seq.tokens) == m
        assert seq.tokens == alone(model, seq.prompt, m, temperature=0)


def test_seeded_sampling_is_the_same_alone_and_batched():
    """Each sequence samples with its own generator, so a seed gives the same text whatever else runs."""
    model = make_model()
    settings = dict(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3)
    ps = prompts([4, 9, 6])
    batched = [Sequence(p, SamplingParams(max_tokens=12, seed=i, **settings)) for i, p in enumerate(ps)]
    engine = Engine(model, max_batch=4)
    run_until_done(engine, batched, {0: 0, 1: 1, 2: 3})
    for i, (p, seq) in enumerate(zip(ps, batched)):
        assert seq.tokens == alone(model, p, 12, generator=torch.Generator().manual_seed(i), **settings)
    different_seed = Sequence(ps[0], SamplingParams(max_tokens=12, seed=99, **settings))
    run_until_done(engine, [different_seed], {0: 0})
    assert different_seed.tokens != batched[0].tokens


def test_stop_ids_context_end_queue_and_timeout():
    model = make_model(max_seq_len=32)
    reference = alone(model, [1, 2, 3], 10, temperature=0)
    stop_at = reference[4]
    first = reference.index(stop_at)
    engine = Engine(model, max_batch=1, max_queue=1)
    stopped = Sequence([1, 2, 3], SamplingParams(max_tokens=10, temperature=0, stop_ids=(stop_at,)))
    run_until_done(engine, [stopped], {0: 0})
    assert stopped.finish_reason == "stop" and stopped.tokens == reference[:first]  # the stop id is not kept
    long = Sequence(list(range(1, 31)), SamplingParams(max_tokens=100, temperature=0))
    run_until_done(engine, [long], {0: 0})
    assert long.finish_reason == "length" and len(long.tokens) == 2  # 30 + 2 = the 32-token context
    with pytest.raises(ValueError, match="prompt"):
        engine.submit(Sequence(list(range(32)), SamplingParams(max_tokens=1)))
    busy = Sequence([1], SamplingParams(max_tokens=50))
    queued = Sequence([2], SamplingParams(max_tokens=5), timeout=1e-9)
    engine.submit(busy)
    engine.step()  # busy takes the only slot
    engine.submit(queued)
    with pytest.raises(QueueFull):
        engine.submit(Sequence([3], SamplingParams(max_tokens=5)))
    engine.cancel(busy)
    engine.step()
    assert busy.finish_reason == "cancelled" and queued.finish_reason == "timeout" and not engine.active
