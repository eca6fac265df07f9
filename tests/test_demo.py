"""demo.py: a piped chat session and its saved transcript, one-shot prompts, history dropping, streaming text."""

import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import demo
import lora
from configs import get_config
from model import GPT
from tests.helpers import make_checkpoint
from tokenizer import StreamDecoder


def expected_reply(directory, tokenizer, ids, max_new_tokens, **sampling):
    """The reply computed independently of demo.py: GPT.generate on the same ids, cut at the stop tokens."""
    model = GPT.from_pretrained(directory).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens, **sampling)[0, len(ids):].tolist()
    stops = [i for i, t in enumerate(out) if t in (tokenizer.im_end_id, tokenizer.eot_id)]
    return tokenizer.decode(out[:stops[0]] if stops else out)


def read_session(output_dir):
    (session,) = list(output_dir.iterdir())
    records = [json.loads(line) for line in (session / "turns.jsonl").read_text().splitlines()]
    return records, (session / "transcript.md").read_text()


def test_piped_chat_session_is_streamed_and_saved(tmp_path, tokenizer):
    ckpt = make_checkpoint(tmp_path / "sft", tokenizer, "sft", max_seq_len=256)  # the whole chat fits
    result = subprocess.run(
        [sys.executable, "demo.py", "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "out"),
         "--temperature", "0", "--max_new_tokens", "6", "--repetition_penalty", "1.0", "--system", "Be kind."],
        input="hello\nhow are you\n/reset\nhi\nexit\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "chat mode" in result.stderr and "Traceback" not in result.stderr
    records, transcript = read_session(tmp_path / "out")
    assert [r["prompt"] for r in records] == ["hello", "how are you", "hi"]
    assert [r["context_turns"] for r in records] == [0, 1, 0]  # /reset forgot the first two turns
    system = [{"role": "system", "content": "Be kind."}]
    conversations = [[{"role": "user", "content": "hello"}],
                     [{"role": "user", "content": "hello"}, {"role": "assistant", "content": records[0]["reply"]},
                      {"role": "user", "content": "how are you"}],
                     [{"role": "user", "content": "hi"}]]
    for record, messages in zip(records, conversations):
        ids = tokenizer.apply_chat_template(system + messages, add_generation_prompt=True)
        assert record["reply"] == expected_reply(ckpt, tokenizer, ids, 6, temperature=0)
        assert record["prompt_tokens"] == len(ids) and 1 <= record["reply_tokens"] <= 6
        assert record["settings"]["temperature"] == 0 and record["checkpoint"] == str(ckpt)
        assert record["tokens_per_s"] == pytest.approx(record["reply_tokens"] / record["seconds"], rel=0.02)
        assert record["stage"] == "sft" and record["mode"] == "chat"
        assert record["reply"] in result.stdout and record["reply"] in transcript
    assert "**system:** Be kind." in transcript and "(conversation reset)" in transcript
    assert result.stderr.count("tokens/s") == 3


def test_one_shot_prompt_continues_text_with_a_reproducible_seed(tmp_path, tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path / "pretrain", tokenizer, "pretrain")
    args = ["--checkpoint", str(ckpt), "--prompt", "Tom has a", "--seed", "5", "--max_new_tokens", "10"]
    for run in ("a", "b"):
        demo.main(args + ["--output_dir", str(tmp_path / run)])
    out, err = capsys.readouterr()
    assert "text mode" in err
    (a,), _ = read_session(tmp_path / "a")
    (b,), _ = read_session(tmp_path / "b")
    assert a["mode"] == "text" and a["reply"] == b["reply"] and out == f"{a['reply']}\n{b['reply']}\n"
    reference = expected_reply(ckpt, tokenizer, tokenizer.encode("Tom has a"), 10, temperature=0.8, top_p=0.95,
                               repetition_penalty=1.1, generator=torch.Generator().manual_seed(5))
    assert a["reply"] == reference


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_with_a_notice(tmp_path, tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path / "pretrain", tokenizer, "pretrain")
    long = " ".join(["Mia has a kite."] * 40)
    demo.main(["--checkpoint", str(ckpt), "--prompt", long, "--max_new_tokens", "8", "--output_dir",
               str(tmp_path / "out")])
    (record,), _ = read_session(tmp_path / "out")
    assert record["prompt_tokens"] == 64 - 8  # the context minus the room kept for the reply
    assert "only its last 56 tokens are used" in capsys.readouterr().err


def test_oldest_turns_are_dropped_first(tokenizer):
    turns = [(f"question {i}", f"answer {i}") for i in range(6)]

    def reference(kept: int) -> list[int]:
        """The template applied to the whole conversation at once: the last `kept` turns and the new message."""
        history = [{"role": role, "content": text} for turn in turns[len(turns) - kept:]
                   for role, text in zip(("user", "assistant"), turn)]
        return tokenizer.apply_chat_template([{"role": "system", "content": "sys"}, *history,
                                              {"role": "user", "content": "new"}], add_generation_prompt=True)

    def prompt(budget: int) -> tuple[list[int], int]:
        chat = demo.Conversation(tokenizer, "sys", budget)
        for user, reply in turns:
            chat.add(user, reply)
        return chat.prompt("new")

    full = reference(6)
    assert prompt(10_000) == (full, 6)
    assert prompt(len(full) - 1) == (reference(5), 5)
    ids, kept = prompt(len(full) // 2)
    assert 0 < kept < 5 and ids == reference(kept)
    assert len(ids) <= len(full) // 2 < len(reference(kept + 1))  # the most turns that fit


def test_stream_decoder_holds_back_partial_characters(tokenizer):
    text = "Tom 你好 😀 has a cake."
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(t) for t in tokenizer.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert "" in pieces and not any("\ufffd" in p for p in pieces)  # bytes were held back, never garbled
    broken = [tokenizer.mergeable_ranks[bytes([b])] for b in "你".encode()[:2]]  # a character cut short
    decoder = StreamDecoder(tokenizer)
    assert "".join(decoder.push(t) for t in broken) + decoder.flush() == tokenizer.decode(broken) == "\ufffd"


def test_ctrl_c_during_a_reply_keeps_what_was_said(tmp_path, tokenizer):
    ckpt = make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    cfg = demo.DemoConfig(checkpoint=str(ckpt), prompt="hello", output_dir=str(tmp_path / "out"), temperature=0,
                          max_new_tokens=20)
    session = demo.Demo(cfg)
    original = session.model.generate_stream

    def interrupted(*args, **kwargs):
        yield from list(original(*args, **kwargs))[:3]
        raise KeyboardInterrupt

    session.model.generate_stream = interrupted
    session.run()
    (record,), transcript = read_session(tmp_path / "out")
    assert record["stop"] == "interrupted" and record["reply_tokens"] == 3
    assert "**user:** hello" in transcript and record["reply"] in transcript


@pytest.mark.parametrize("show_think", [False, True])
def test_the_reasoning_is_shown_only_with_show_think(tmp_path, tokenizer, capsys, show_think):
    ckpt = make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    cfg = demo.DemoConfig(checkpoint=str(ckpt), prompt="Who has a kite?", output_dir=str(tmp_path / "out"),
                          show_think=show_think)
    session = demo.Demo(cfg)
    reply = "<think>Tom has a kite.</think>Tom has a kite."
    tokens = [*tokenizer.encode_reply(reply), tokenizer.im_end_id]
    session.model.generate_stream = lambda *args, **kwargs: (torch.tensor([t]) for t in tokens)
    session.run()
    out, err = capsys.readouterr()
    (record,), transcript = read_session(tmp_path / "out")
    assert record["reply"] == reply and reply in transcript  # the transcript keeps all of it
    n_think = len(tokenizer.encode_reply("<think>Tom has a kite.</think>"))
    assert out == (f"{reply}\n" if show_think else "Tom has a kite.\n")
    assert (f"({n_think} of reasoning, not shown" in err) != show_think


def test_sessions_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.time, "strftime", lambda fmt: "20250101-120000")
    dirs = [demo.new_session_dir(tmp_path) for _ in range(3)]
    assert len(set(dirs)) == 3 and all(d.is_dir() for d in dirs)


def test_the_newest_checkpoint_is_picked(tmp_path, tokenizer):
    for i, stage in enumerate(("sft", "pretrain")):
        make_checkpoint(tmp_path / stage, tokenizer, stage)
        os.utime(tmp_path / stage / "config.json", (1000 + i, 1000 + i))
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "pretrain"
    # An adapter-only checkpoint (no model.safetensors, as lora.save_lora_checkpoint writes it) counts too.
    adapter = make_checkpoint(tmp_path / "lora", tokenizer, "lora")
    (adapter / checkpoint.WEIGHTS).unlink()
    (adapter / lora.ADAPTER_CONFIG).write_text("{}")
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "lora"
    make_checkpoint(tmp_path / "reward", tokenizer, "reward")  # newer, but the demo leaves reward models out
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "reward"
    assert checkpoint.latest_checkpoint(tmp_path, exclude=("reward",)) == tmp_path / "lora"


def test_missing_broken_or_unloadable_checkpoints_are_one_line_errors(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: no checkpoint under checkpoint/; train one first: "
                                         r"python train_pretrain.py"):
        demo.main([])
    ckpt = make_checkpoint(tmp_path / "checkpoint" / "pretrain", tokenizer, "pretrain")
    (ckpt / checkpoint.WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(SystemExit, match=r"^error: broken checkpoint: .*model.safetensors: cannot read weights"):
        demo.main([])
    with pytest.raises(SystemExit, match=r"^error: --top_p must be in \(0, 1\], got 1.5$"):
        demo.main(["--top_p", "1.5"])


def test_model_type_is_only_a_check_against_the_checkpoint(tmp_path, tokenizer, capsys):
    small = make_checkpoint(tmp_path / "small", tokenizer, "sft")  # TINY_MODEL's shape, which is no preset
    torch.manual_seed(0)
    tiny = GPT(get_config("tiny", vocab_size=tokenizer.vocab_size))
    checkpoint.save_checkpoint(tmp_path / "tiny", tiny, tokenizer, {"stage": "sft"})

    def run(path, model_type):
        demo.main(["--checkpoint", str(path), "--model_type", model_type, "--prompt", "hi", "--max_new_tokens", "2",
                   "--output_dir", str(tmp_path / "out")])

    run(tmp_path / "tiny", "tiny")  # the right preset: accepted
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--model_type tiny: .*small is not of that shape: dim=32 \(the preset "
                                         r"has 256\).*config.json gives its shape"):
        run(small, "tiny")
    with pytest.raises(SystemExit, match="--model_type must be one of tiny, "):
        run(small, "llama-7b")
    with pytest.raises(SystemExit, match="is a file; a checkpoint is a directory with config.json, the weights and "
                                         "the tokenizer"):
        run(small / "model.safetensors", "tiny")
