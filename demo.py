"""Talk to a trained model: the reply streams token by token, and every session is saved as it goes.

    python demo.py                                  # the newest run under checkpoint/ (its best model)
    python demo.py --checkpoint checkpoint/sft --top_p 0.95 --system "You tell stories to children."
    python demo.py --prompt "Who is Lily?"          # answer one prompt and exit (for scripts)
    python demo.py --quantize int8                  # int8 weights: faster replies on a CPU (quant.py)

A chat checkpoint (sft, dpo, lora) runs as a multi-turn chat through the ChatML template. A pretraining
checkpoint has never seen the template, so it continues the text you type instead (--mode overrides).
Commands: /help, /reset (forget the conversation), exit or quit (or Ctrl-D, Ctrl-C).
Each session is written, turn by turn, to OUTPUT_DIR/<timestamp>/: transcript.md to read, and turns.jsonl
with one record per turn (prompt, reply, sampling settings, checkpoint, token counts, speed).
"""

import itertools
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import (
    PRESETS,
    ModelConfig,
    QuantizeOption,
    check_options,
    device_rules,
    exit_on_bad_input,
    option,
    parse_args,
)
from devices import pick_compile, pick_device, pick_dtype
from fileio import writable_dir
from pretrained import find_checkpoint, load_checkpoint
from tokenizer import StreamDecoder, Tokenizer

HELP = "commands: /reset forgets the conversation, /help shows this, exit or quit (or Ctrl-D) ends the session"


@dataclass
class DemoConfig(QuantizeOption):
    checkpoint: str | None = option("checkpoint directory; None = the newest run under checkpoint/ (its best/ if it "
                                    "kept one)", default=None)
    model_type: str | None = option(f"a preset name ({', '.join(PRESETS)}), only checked against the checkpoint: "
                                    "a checkpoint directory carries its own shape (config.json) and tokenizer, so "
                                    "no preset is needed to load it, and a bare weights file without them cannot "
                                    "be loaded (its tokenizer is missing)", default=None)
    mode: str = option("'chat' (ChatML, multi-turn), 'text' (continuation) or 'auto' (from the checkpoint's stage)",
                       default="auto")
    max_new_tokens: int = option("longest reply, in tokens", default=256)
    temperature: float = option("sampling temperature; 0 = greedy (always the most likely token)", default=0.8)
    top_k: int | None = option("sample only among the k most likely tokens; None = off", default=None)
    top_p: float | None = option("nucleus sampling: only the most likely tokens that together reach this "
                                 "probability; None = off", default=0.95)
    repetition_penalty: float = option("> 1 makes tokens already in the conversation less likely", default=1.1)
    seed: int | None = option("random seed, for reproducible samples; None = a fresh one (saved with each turn)",
                              default=None)
    system: str | None = option("system prompt (chat mode)", default=None)
    device: str = option("'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'mps'", default="auto")
    dtype: str = option("'auto' (bfloat16/float16 on CUDA, else float32), 'float32', 'bfloat16', 'float16'",
                        default="auto")
    compile: str = option("torch.compile the one-token decode step: auto (CUDA on Linux), true or false; replies "
                          "come faster after a one-off compile (tens of seconds on a CPU)", default="auto")
    output_dir: str = option("sessions are saved under OUTPUT_DIR/<timestamp>/", default="demo")
    prompt: str | None = option("answer this one prompt, print the reply and exit", default=None)
    show_think: bool = option("print the reasoning of a reply in the reasoning format (<think>…</think>, then the "
                              "answer); else only the answer is printed (the transcript always keeps both)",
                              default=False)

    def __post_init__(self):
        """One-line ValueErrors for settings that cannot work."""
        check_options(self, [("mode", self.mode in ("auto", "chat", "text"), "must be auto, chat or text"),
                             ("model_type", self.model_type in (None, *PRESETS),
                              f"must be one of {', '.join(PRESETS)}"),
                             ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                             ("temperature", self.temperature >= 0, "must be >= 0"),
                             ("top_k", self.top_k is None or self.top_k >= 0, "must be >= 0"),
                             ("top_p", self.top_p is None or 0 < self.top_p <= 1, "must be in (0, 1]"),
                             ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
                             *device_rules(self)])


def info(message: str):
    """Status lines go to stderr, so that stdout holds only the model's text (for --prompt in scripts)."""
    print(message, file=sys.stderr, flush=True)


def utf8_text(text: str, what: str) -> str:
    """text with any bytes that are not UTF-8 replaced by U+FFFD (said on stderr). Python keeps such bytes of the
    command line, and of stdin as run() reads it, as lone surrogates, which no file or tokenizer accepts."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        data = text.encode("utf-8", "surrogatepass")
    clean = data.decode("utf-8", "replace")
    if clean != text:
        info(f"[{what} held bytes that are not UTF-8 text: each is replaced by \ufffd]")
    return clean


# ----------------------------------------------------------------------------- checkpoints
def check_model_type(preset: str, config: ModelConfig, directory) -> None:
    """--model_type: a one-line error if the checkpoint is not of that preset's shape."""
    wrong = [f"{k}={getattr(config, k)} (the preset has {v})" for k, v in PRESETS[preset].items()
             if k != "vocab_size" and getattr(config, k) != v]
    if wrong:
        raise ValueError(f"--model_type {preset}: {directory} is not of that shape: {', '.join(wrong)}; leave "
                         f"--model_type out, the checkpoint's config.json gives its shape")


# ----------------------------------------------------------------------------- prompts and streaming text
class Conversation:
    """A chat as token ids: the system prompt's, then each earlier (user, assistant) turn's, each encoded once.

    The template encodes every message on its own, so these ids joined are the ids of the whole conversation.
    A prompt takes the newest turns that fit in `budget` tokens with the new message (the system prompt and the
    new message always stay); a turn more than budget tokens back can never fit again and is forgotten. So the
    cost of a prompt is bounded by the context, however long the session.
    """

    def __init__(self, tokenizer: Tokenizer, system: str | None, budget: int):
        self.tokenizer, self.budget = tokenizer, budget
        self.head = tokenizer.apply_chat_template([{"role": "system", "content": system}]) if system else []
        self.turns: deque[list[int]] = deque()  # the turns that may still fit, oldest first
        self.n_tokens = 0  # of self.turns
        self.n_turns = 0  # every turn of the conversation, forgotten ones included

    def prompt(self, user: str) -> tuple[list[int], int]:
        """(ids ready for the reply to `user`, number of earlier turns they include)."""
        tail = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
        room, kept = self.budget - len(self.head) - len(tail), []
        for turn in reversed(self.turns):
            if len(turn) > room:
                break
            room -= len(turn)
            kept.append(turn)
        return self.head + [t for turn in reversed(kept) for t in turn] + tail, len(kept)

    def add(self, user: str, reply: str):
        self.turns.append(self.tokenizer.apply_chat_template([{"role": "user", "content": user},
                                                              {"role": "assistant", "content": reply}]))
        self.n_turns += 1
        self.n_tokens += len(self.turns[-1])
        while self.n_tokens > self.budget:  # the oldest turn and every newer one no longer fit together
            self.n_tokens -= len(self.turns.popleft())


# ----------------------------------------------------------------------------- saved sessions
def new_session_dir(root) -> Path:
    """A fresh root/<YYYYmmdd-HHMMSS>[-n]/: mkdir fails on an existing name, so two sessions started in the
    same second (even in two processes) get two directories."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        directory = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            directory.mkdir()
            return directory
        except FileExistsError:
            continue


class Transcript:
    """transcript.md and turns.jsonl of one session, appended and flushed as it goes (a crash loses nothing)."""

    def __init__(self, root):
        self.dir = new_session_dir(root)
        self.md = open(self.dir / "transcript.md", "a", encoding="utf-8")
        self.jsonl = open(self.dir / "turns.jsonl", "a", encoding="utf-8")

    def write(self, text: str):
        self.md.write(text)
        self.md.flush()

    def add_turn(self, record: dict):
        self.jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.jsonl.flush()

    def close(self):
        self.md.close()
        self.jsonl.close()


# ----------------------------------------------------------------------------- the session
class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        for name in ("prompt", "system"):
            if getattr(cfg, name) is not None:
                setattr(cfg, name, utf8_text(getattr(cfg, name), f"--{name}"))
        writable_dir(cfg.output_dir, "--output_dir")
        self.device = pick_device(cfg.device)
        compile_decoding = pick_compile(cfg.compile, self.device)  # checks --compile before the checkpoint loads
        self.checkpoint = found = find_checkpoint(cfg.checkpoint, log=info)
        model, self.tokenizer, self.stage = load_checkpoint(found, self.device, log=info, quantize=cfg.quantize)
        if cfg.model_type is not None:
            check_model_type(cfg.model_type, model.config, found)
        self.model = model.to(self.device, pick_dtype(cfg.dtype, self.device)).eval()
        if compile_decoding:
            info("compiling the decode step (torch.compile; --compile false skips this) ...")
            self.model.compile_decoding(log=info)
        self.mode = cfg.mode if cfg.mode != "auto" else ("text" if self.stage in ("pretrain", None) else "chat")
        if self.mode == "text":
            info(f"text mode: the checkpoint (stage {self.stage or 'unknown'}) has not been trained on the chat "
                 f"template, so it continues the text you type (--mode chat to chat anyway)")
        else:
            info(f"chat mode (stage {self.stage or 'unknown'}){' with a system prompt' if cfg.system else ''}")
        context = self.model.config.max_seq_len
        # Leave room for the reply in the context (at most half of it), so a long history does not make the
        # model slide past its own question while answering.
        self.budget = context - min(cfg.max_new_tokens, context // 2)
        self.stop_ids = [self.tokenizer.im_end_id, self.tokenizer.eot_id]
        self.seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.settings = {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                      "repetition_penalty")} | {"seed": self.seed}
        self.conversation = Conversation(self.tokenizer, cfg.system, self.budget)  # since the last /reset
        self.n_turns = 0
        self.transcript = Transcript(cfg.output_dir)
        self.transcript.write(
            f"# {self.mode} session with {found}\n\nstarted {time.strftime('%Y-%m-%d %H:%M:%S')}; stage "
            f"{self.stage or 'unknown'}; {model.num_params() / 1e6:.2f}M parameters on {self.device}; "
            + ", ".join(f"{k}={v}" for k, v in self.settings.items()) + "\n\n"
            + (f"**system:** {cfg.system}\n\n" if cfg.system and self.mode == "chat" else ""))

    def prompt_ids(self, text: str) -> tuple[list[int], int]:
        """The ids to continue, and how many earlier turns they include."""
        if self.mode == "chat":
            ids, kept = self.conversation.prompt(text)
        else:
            ids, kept = self.tokenizer.encode(text), 0
        if len(ids) > self.budget:
            info(f"[the prompt is {len(ids)} tokens, longer than the {self.budget} that fit before the reply: "
                 f"only its last {self.budget} tokens are used]")
            ids = ids[-self.budget:]
        return ids, kept

    def generate(self, ids: list[int]) -> tuple[str, int, int, str, float]:
        """Stream the reply to stdout, in chat mode without its reasoning unless --show_think; returns (text,
        tokens, tokens of hidden reasoning, why it stopped, seconds)."""
        cfg = self.cfg
        decoder, pieces, n, stop = StreamDecoder(self.tokenizer), [], 0, "max_new_tokens"
        think_start, think_end = self.tokenizer.think_ids or (None, None)
        hide = self.mode == "chat" and not cfg.show_think  # the reasoning format is that of chat replies
        thinking, hidden = False, 0
        t0 = time.perf_counter()
        try:
            for token in self.model.generate_stream(
                    torch.tensor([ids], device=self.device), cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                    cfg.top_p, cfg.repetition_penalty, self.stop_ids, self.generator):
                token = token.item()
                if token in self.stop_ids:
                    stop = "eos"
                    break
                n += 1
                pieces.append(decoder.push(token))
                thinking = (thinking or token == think_start) and hide
                if thinking:
                    hidden += 1
                else:
                    print(pieces[-1], end="", flush=True)
                thinking = thinking and token != think_end
        except KeyboardInterrupt:
            stop = "interrupted"
        pieces.append(decoder.flush())
        print("" if thinking else pieces[-1], flush=True)
        return "".join(pieces), n, hidden, stop, time.perf_counter() - t0

    def turn(self, text: str) -> bool:
        """Answer one message and save the turn; False if Ctrl-C interrupted it (the session then ends)."""
        ids, kept = self.prompt_ids(text)
        dropped = self.conversation.n_turns - kept if self.mode == "chat" else 0
        if dropped:
            info(f"[the conversation is longer than the context: the oldest {dropped} turn(s) are left out]")
        self.transcript.write(f"**{'user' if self.mode == 'chat' else 'prompt'}:** {text}\n\n")
        reply, n, hidden, stop, seconds = self.generate(ids)
        speed = n / seconds if seconds > 0 else 0.0
        thought = f" ({hidden} of reasoning, not shown: --show_think shows it)" if hidden else ""
        info(f"[{n} tokens{thought}, {speed:.1f} tokens/s{', interrupted' if stop == 'interrupted' else ''}]")
        self.n_turns += 1
        self.transcript.write(f"**{'assistant' if self.mode == 'chat' else 'continuation'}:** {reply}\n\n"
                              f"*{n} tokens, {speed:.1f} tokens/s, stopped by {stop}*\n\n")
        self.transcript.add_turn({
            "turn": self.n_turns, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": str(self.checkpoint),
            "stage": self.stage, "mode": self.mode, "system": self.cfg.system if self.mode == "chat" else None,
            "prompt": text, "reply": reply, "stop": stop, "context_turns": kept,
            "dropped_turns": dropped, "prompt_tokens": len(ids), "reply_tokens": n,
            "seconds": round(seconds, 4), "tokens_per_s": round(speed, 2), "settings": self.settings})
        if self.mode == "chat":
            self.conversation.add(text, reply)
        return stop != "interrupted"

    def run(self):
        try:
            if self.cfg.prompt is not None:
                self.turn(self.cfg.prompt)
                return
            info(HELP)
            echo = not sys.stdin.isatty()  # piped input is not shown by the terminal: show it
            if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach utf8_text instead of raising
                sys.stdin.reconfigure(errors="surrogateescape")
            while True:
                try:
                    line = utf8_text(input("you> " if self.mode == "chat" else "text> "), "the input")
                except (EOFError, KeyboardInterrupt):
                    print()
                    return
                if echo:
                    print(line)
                text = line.strip()
                if text in ("exit", "quit"):
                    return
                if text == "/reset":
                    self.conversation = Conversation(self.tokenizer, self.cfg.system, self.budget)
                    self.transcript.write("*(conversation reset)*\n\n")
                    info("[conversation cleared]")
                elif text == "/help":
                    info(HELP)
                elif text.startswith("/"):
                    info(f"unknown command {text}; {HELP}")
                elif text and not self.turn(text):
                    return
        finally:
            self.transcript.close()
            info(f"session saved in {self.transcript.dir}")


def main(argv: list[str] | None = None):
    cfg = parse_args(DemoConfig, argv, description=__doc__)
    try:
        with exit_on_bad_input():
            Demo(cfg).run()
    except KeyboardInterrupt:  # outside a reply or the input line; the transcript is already closed
        sys.exit(130)


if __name__ == "__main__":
    main()
