"""Evaluations: greedy answers, perplexity and bits per byte, and multiple choice by log-likelihood.

  answers          greedy replies scored by exact match (and containment) against the expected answers:
                   the stages' answer accuracy, eval.py's `storyworld` and `generate` tasks
  perplexity       loss (nats per token), perplexity and bits per byte of text or of a prepared .bin file
  multiple choice  lm-evaluation-harness 0.4's scoring: each option's summed log-likelihood given the question;
                   acc (argmax of the sum), acc_norm (of the sum / the option's length in characters) and
                   acc_bytes (/ its length in UTF-8 bytes); ARC, HellaSwag, MMLU, C-Eval and CMMLU rows

`evaluate_task` runs one of eval.py's tasks on a loaded model; report.py uses it too.
"""

import functools
import json
import math
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs import check_options, option
from dataset import DataError, PretrainDataset, first_question, load_chats, read_jsonl, where_prefix
from prepare import iter_documents
from storyworld import FACTS
from tokenizer import split_think

CJK = re.compile(r"[\u3400-\u9fff]")
FINAL_PUNCTUATION = ".!?,;:。！？，；：…\"'“”‘’ "


def normalise_answer(text: str) -> str:
    """Lower case, whitespace runs as one space, final punctuation dropped (what answer_matches compares)."""
    return " ".join(text.split()).lower().rstrip(FINAL_PUNCTUATION)


def answer_matches(reply: str, expected: str) -> bool:
    """Exact match up to whitespace, case and final punctuation: 'lily found a red ball' == 'Lily found a red ball.'"""
    return normalise_answer(reply) == normalise_answer(expected)


def _mean(xs) -> float:
    return sum(xs) / len(xs) if len(xs) else float("nan")


# ----------------------------------------------------------------------------- greedy answers
@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int = 64,
                    batch_size: int = 32, progress: bool = False) -> list[list[int]]:
    """The greedy continuation of each prompt's ids, cut before the first stop id, a batch at a time.

    Prompts are batched by length (less padding) and left-padded to a common length; attention_mask keeps the
    padding out of attention, and since RoPE is relative the padding does not shift the real tokens either.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress,
                      leave=False):
        rows = order[start:start + batch_size]
        T = max(len(prompts[i]) for i in rows)
        idx = torch.tensor([[tokenizer.pad_id] * (T - len(prompts[i])) + prompts[i] for i in rows], device=device)
        mask = torch.tensor([[0] * (T - len(prompts[i])) + [1] * len(prompts[i]) for i in rows], device=device)
        steps = min(max_new_tokens, model.config.max_seq_len - T)  # no sliding window: padding would slide too
        new = model.generate(idx, steps, temperature=0, eos_id=stop_ids, attention_mask=mask)[:, T:]
        for i, row in zip(rows, new.tolist()):
            out[i] = row[:next((j for j, t in enumerate(row) if t in stop_ids), len(row))]
    return out


def greedy_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64,
                   batch_size: int = 32, progress: bool = False) -> list[str]:
    """The model's greedy reply to each chat prompt (ChatML), up to its <|im_end|>."""
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    stop_ids = [tokenizer.im_end_id, tokenizer.eot_id]
    return [tokenizer.decode(r) for r in greedy_generate(model, tokenizer, ids, stop_ids, max_new_tokens,
                                                         batch_size, progress)]


def greedy_text_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                              batch_size: int = 32, progress: bool = False) -> list[str]:
    """Plain-text continuations (for models never trained on the chat template), each up to its first line end."""
    ids = [tokenizer.encode(p) for p in prompts]
    replies = greedy_generate(model, tokenizer, ids, [tokenizer.eot_id], max_new_tokens, batch_size, progress)
    return [tokenizer.decode(r).strip().split("\n")[0] for r in replies]


def score_answers(replies: list[str], answers: list[str], groups: dict[str, list[str]] | None = None) -> dict:
    """acc: exact match up to whitespace, case and final punctuation (answer_matches); contains: the normalised
    answer appears in the normalised reply; n. For each grouping (e.g. {"lang": ["en", "zh", ...]}) also
    acc_<group> per value. In the reasoning format (`<think>…</think>answer`) only the part after </think> is
    scored, of the reply and of the expected answer alike, so a reply that never closes its <think> is wrong."""
    replies, answers = [split_think(r)[1] for r in replies], [split_think(a)[1] for a in answers]
    exact = [answer_matches(r, a) for r, a in zip(replies, answers)]
    contains = [normalise_answer(a) in normalise_answer(r) for r, a in zip(replies, answers)]
    results = {"acc": _mean(exact), "contains": _mean(contains), "n": len(exact)}
    for labels in (groups or {}).values():
        for value in sorted(set(labels)):
            results[f"acc_{value}"] = _mean([e for e, v in zip(exact, labels) if v == value])
    return results


def language(text: str) -> str:
    """'zh' if text holds CJK characters, else 'en'."""
    return "zh" if CJK.search(text) else "en"


def answer_accuracy(model, tokenizer, records: list[list[dict]], max_new_tokens: int = 64) -> dict[str, float]:
    """Exact-match accuracy of greedy answers to the first question of each held-out chat.

    records are message lists (e.g. from sft_val.jsonl). A reply matches if it equals the expected answer up to
    whitespace, case and final punctuation, after </think> in the reasoning format (score_answers). Also split by
    the answer's language (Chinese if it contains CJK characters); a language without samples gives nan.
    """
    was_training = model.training
    model.eval()
    prompts, expected = zip(*(first_question(m) for m in records))
    replies = greedy_replies(model, tokenizer, list(prompts), max_new_tokens)
    model.train(was_training)
    scores = score_answers(replies, list(expected), {"lang": [language(split_think(a)[1]) for a in expected]})
    return {"answer_acc": scores["acc"], "answer_acc_en": scores.get("acc_en", float("nan")),
            "answer_acc_zh": scores.get("acc_zh", float("nan"))}


@functools.cache
def _question_patterns() -> list[tuple[str, re.Pattern]]:
    """(fact, regex) for every StoryWorld question template, in both languages: {slots} match any text."""
    patterns = []
    for fact, f in FACTS.items():
        for template in (f.en_question, f.zh_question):
            parts = re.split(r"\{\w+\}", template)
            patterns.append((fact, re.compile("(.+?)".join(map(re.escape, parts)))))
    return patterns


def question_type(question: str) -> str:
    """The StoryWorld fact a question asks about ('found', 'helper', ...), from its last line; 'other' if none."""
    line = question.strip().split("\n")[-1].strip()
    return next((fact for fact, pattern in _question_patterns() if pattern.fullmatch(line)), "other")


def storyworld_accuracy(model, tokenizer, chats: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 32,
                        progress: bool = False) -> tuple[dict, list[dict]]:
    """Greedy answers to the first question of each held-out StoryWorld chat, scored by exact match overall, by
    language (acc_en, acc_zh) and by question type (acc_found, acc_helper, ...); and the answers themselves
    ({"question", "expected", "reply"})."""
    prompts, expected = zip(*(first_question(m) for m in chats))
    replies = greedy_replies(model, tokenizer, list(prompts), max_new_tokens, batch_size, progress)
    questions = [p[-1]["content"] for p in prompts]
    groups = {"lang": [language(split_think(a)[1]) for a in expected], "type": [question_type(q) for q in questions]}
    samples = [{"question": q, "expected": a, "reply": r} for q, a, r in zip(questions, expected, replies)]
    return score_answers(replies, list(expected), groups), samples


def read_prompt_answers(path) -> tuple[list[str], list[str]]:
    """(prompts, answers) of a JSONL file of {"prompt": ..., "answer": ...} rows; errors name the file and line."""
    prompts, answers = [], []
    for line, row in read_jsonl(path):
        where = f"{where_prefix(str(path))}{line}"
        for field in ("prompt", "answer"):
            if not isinstance(row.get(field), str):
                raise DataError(f"{where}: needs a string field '{field}' (a row is {{prompt, answer}})")
        prompts.append(row["prompt"])
        answers.append(row["answer"])
    if not prompts:
        raise ValueError(f"{path}: no rows")
    return prompts, answers


# ----------------------------------------------------------------------------- log-likelihoods and perplexity
@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], int]], pad_id: int, batch_size: int = 16,
                   desc: str | None = None) -> list[tuple[float, bool]]:
    """For each (tokens, n): the summed log-probability of the last n tokens, each given all the tokens before it,
    and whether greedy decoding picks every one of them (lm-evaluation-harness's (loglikelihood, is_greedy)).

    A sequence longer than max_seq_len + 1 tokens loses its oldest tokens, as in the harness. Requests are run
    longest first, right-padded (causal attention never looks ahead, so the padding changes nothing).
    """
    device = next(model.parameters()).device
    max_len = model.config.max_seq_len
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=desc is None, leave=False):
        rows = order[start:start + batch_size]
        seqs = []
        for i in rows:
            tokens, n = requests[i]
            tokens = [int(t) for t in tokens[-(max_len + 1):]]  # lists, or windows of a memory-mapped file
            if not 0 < n < len(tokens):
                raise ValueError(f"cannot score {n} tokens of a {len(tokens)}-token sequence (the first one is "
                                 f"context only; at most {max_len} fit the model)")
            seqs.append(tokens)
        width = max(len(s) for s in seqs) - 1
        inputs = torch.tensor([s[:-1] + [pad_id] * (width - len(s) + 1) for s in seqs], device=device)
        logits = model(inputs)
        for row, (i, tokens) in enumerate(zip(rows, seqs)):
            n, end = requests[i][1], len(tokens) - 1
            logp = torch.log_softmax(logits[row, end - n:end].float(), dim=-1)
            target = torch.tensor(tokens[-n:], device=device)
            results[i] = (logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
    return results


def rolling_windows(tokens: list[int], max_len: int) -> list[tuple[list[int], int]]:
    """Requests scoring every token of `tokens` but the first (context only) exactly once, in windows of at most
    max_len + 1 tokens, each window after the first filled with the tokens before it (lm-evaluation-harness's
    loglikelihood_rolling with context_len 1)."""
    windows, scored = [], 1
    while scored < len(tokens):
        end = min(scored + max_len, len(tokens))
        windows.append((tokens[max(0, end - max_len - 1):end], end - scored))
        scored = end
    return windows


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for (0 for special tokens such as <|endoftext|>)."""
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for token, i in tokenizer.mergeable_ranks.items():
        lengths[i] = len(token)
    return lengths


def perplexity(model, tokenizer, sequences: Iterable[list[int]], batch_size: int = 16,
               progress: bool = False) -> dict:
    """Loss, perplexity and bits per byte over token sequences whose first token is context only.

    loss = total nats / tokens scored; perplexity = exp(loss); bits_per_byte = total nats / (ln 2 x the UTF-8
    bytes of the text scored), which compares across tokenizers. Long sequences are scored in rolling windows.
    """
    requests = [w for seq in sequences for w in rolling_windows(seq, model.config.max_seq_len)]
    if not requests:
        raise ValueError("nothing to score (no sequence longer than one token)")
    scores = loglikelihoods(model, requests, tokenizer.pad_id, batch_size, "scoring" if progress else None)
    nats = -sum(s for s, _ in scores)
    tokens = sum(n for _, n in requests)
    byte_lengths = token_byte_lengths(tokenizer)
    n_bytes = int(sum(byte_lengths[np.asarray(seq[-n:])].sum() for seq, n in requests))
    return {"loss": nats / tokens, "perplexity": math.exp(nats / tokens),
            "bits_per_byte": nats / (math.log(2) * n_bytes) if n_bytes else float("nan"),
            "tokens": tokens, "bytes": n_bytes}


def perplexity_sequences(source: str, tokenizer, max_tokens: int = 0, text_field: str = "text",
                         limit: int = 0) -> Iterator[list[int]]:
    """What `perplexity` scores for a source: a prepared .bin file (one stream; its first token is context), or
    the documents of a .txt/.jsonl/.parquet file or hf:NAME, each as <|endoftext|> + its tokens (so its first
    token is predicted from a document start, as in pretraining). At most max_tokens tokens (0 = all) of at
    most `limit` documents (0 = all)."""
    if source.endswith(".bin"):
        path = Path(source)
        yield PretrainDataset(path.parent, path.stem, 1).tokens[:max_tokens + 1 if max_tokens else None]
        return
    total = 0
    for doc in iter_documents(source, text_field, max_docs=limit):
        if max_tokens and total >= max_tokens:
            return
        ids = [tokenizer.eot_id, *tokenizer.encode(doc)]
        if max_tokens:
            ids = ids[:max_tokens - total + 1]
        total += len(ids) - 1
        yield ids


# ----------------------------------------------------------------------------- multiple choice
@dataclass
class ChoiceQuestion:
    """One multiple-choice item as lm-evaluation-harness 0.4's task of its layout renders it: the query
    (doc_to_text), the options (doc_to_choice; each scored as " " + option) and the right option's index."""

    query: str
    choices: list[str]
    gold: int
    layout: str  # arc, hellaswag, mmlu, ceval (C-Eval and CMMLU share a template)
    description: str = ""  # the task's description, before the few-shot examples (MMLU's subject line)


FIRST_N_LAYOUTS = ("mmlu", "ceval")  # few-shot examples: the first k (the harness's first_n sampler)
# hf: names: (split scored, split the few-shot examples come from), as in the harness's task files.
HF_CHOICE_SPLITS = {"allenai/ai2_arc": ("test", "train"), "Rowan/hellaswag": ("validation", "train"),
                    "cais/mmlu": ("test", "dev"), "ceval/ceval-exam": ("val", "dev"),
                    "haonan-li/cmmlu": ("test", "dev")}


def _hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag preprocess: WikiHow's bracketed artefacts removed."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def choice_layout(row: dict) -> str:
    """Which data set's layout a row has, by its fields ('' if none)."""
    if "endings" in row:
        return "hellaswag"
    if "answerKey" in row:
        return "arc"
    if "choices" in row:
        return "mmlu"
    return "ceval" if {"A", "B", "C", "D"} <= set(row) else ""


def parse_choice_row(row: dict, where: str, subject: str = "", layout: str = "") -> ChoiceQuestion:
    """One row of ARC (Hugging Face's or AI2's JSONL), HellaSwag, MMLU (cais/mmlu JSONL), C-Eval or CMMLU (their
    CSV columns), as the harness's task renders it; layout '' = recognise it by the row's fields. A malformed row
    raises a DataError naming where it is."""
    layout = layout or choice_layout(row)
    if not layout:
        raise DataError(f"{where}: no multiple-choice layout has the fields {', '.join(map(str, row))} (ARC: "
                        "answerKey; HellaSwag: endings; MMLU: choices, answer; C-Eval/CMMLU: A, B, C, D, answer)")
    try:
        if layout == "hellaswag":
            query = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
            question = ChoiceQuestion(query, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]), layout)
        elif layout == "arc":
            q = row["question"]
            if isinstance(q, dict):  # AI2's own files: {"question": {"stem", "choices": [{"text", "label"}]}}
                texts, labels, q = [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]], q["stem"]
            else:
                texts, labels = row["choices"]["text"], row["choices"]["label"]
            question = ChoiceQuestion(f"Question: {q}\nAnswer:", list(texts), list(labels).index(row["answerKey"]),
                                      layout)
        elif layout == "mmlu":
            c = row["choices"]
            if len(c) != 4:
                raise ValueError(f"MMLU rows have 4 choices, this one {len(c)}")
            query = f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
            subject = row.get("subject") or subject
            question = ChoiceQuestion(query, ["A", "B", "C", "D"], int(row["answer"]), layout,
                                      mmlu_description(subject) if subject else "")
        else:
            q, answer = row.get("question", row.get("Question")), row.get("answer", row.get("Answer"))
            if q is None or answer is None:
                raise KeyError("question" if q is None else "answer (C-Eval's test split has none: use val)")
            if answer not in ("A", "B", "C", "D"):
                raise ValueError(f"answer {answer!r} is not A, B, C or D")
            query = f"{q.strip()}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案："
            question = ChoiceQuestion(query, ["A", "B", "C", "D"], ["A", "B", "C", "D"].index(answer), layout)
    except KeyError as e:
        raise DataError(f"{where}: {layout} row without field {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{where}: malformed {layout} row ({e})") from None
    if not 0 <= question.gold < len(question.choices) or not all(isinstance(c, str) for c in question.choices):
        raise DataError(f"{where}: the answer {question.gold} is not one of its {len(question.choices)} text choices")
    return question


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a C-Eval/CMMLU CSV (with a header) or an MMLU CSV (no header: question, A-D, answer)."""
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        has_header = {"A", "B", "C", "D"} <= set(header)
        rows = reader if has_header else [header, *reader]
        for cells in rows:
            where = f"{path}:{reader.line_num}"
            if has_header:
                yield where, dict(zip(header, cells))
            elif len(cells) != 6 or cells[5] not in ("A", "B", "C", "D"):
                raise DataError(f"{where}: an MMLU CSV row is question, A, B, C, D, answer letter "
                                f"(got {len(cells)} cells)")
            else:
                yield where, {"question": cells[0], "choices": cells[1:5], "answer": "ABCD".index(cells[5])}


def read_choice_questions(source: str, limit: int = 0) -> list[ChoiceQuestion]:
    """The questions of a local file (.csv: C-Eval, CMMLU or MMLU; .jsonl/.json lines: ARC, HellaSwag, MMLU) or of
    hf:NAME[:CONFIG][@SPLIT] (e.g. hf:allenai/ai2_arc:ARC-Easy, hf:cais/mmlu:anatomy@dev; default split: the one
    the harness scores). MMLU's subject, for its description line, is the row's or the file name's
    (anatomy_test.csv). At most `limit` questions (0 = all)."""
    if source.startswith("hf:"):
        rows, subject = _hf_rows(source), _hf_spec(source)[1]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file")
        if path.suffix == ".csv":
            rows = _csv_rows(path)
        elif path.suffix in (".jsonl", ".json"):
            rows = ((f"{where_prefix(source)}{line}", row) for line, row in read_jsonl(path))
        else:
            raise ValueError(f"{source}: unknown file type '{path.suffix}'; use .csv or .jsonl (or hf:NAME)")
        subject = re.sub(r"_(test|val|dev|train)$", "", path.stem)
    questions: list[ChoiceQuestion] = []
    for where, row in rows:  # every row in the layout of the first
        if limit and len(questions) >= limit:
            break
        layout = questions[0].layout if questions else ""
        questions.append(parse_choice_row(row, where, subject if subject != "all" else "", layout))
    if not questions:
        raise ValueError(f"{source}: no questions")
    return questions


def _hf_spec(source: str) -> tuple[str, str, str]:
    """(name, config, split) of hf:NAME[:CONFIG][@SPLIT]; the split defaults to the one the harness scores."""
    spec, _, split = source[3:].partition("@")
    name, _, config = spec.partition(":")
    return name, config, split or HF_CHOICE_SPLITS.get(name, ("test",))[0]


def _hf_rows(source: str, split: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) of hf:NAME[:CONFIG][@SPLIT] (or of another split) through `datasets` (needs a network or
    its cache)."""
    name, config, default_split = _hf_spec(source)
    split = split or default_split
    try:
        from datasets import load_dataset  # imported here: slow, and only needed for hf: sources

        data = load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, a wrong name or config: the hub's errors are many and long
        raise ValueError(f"{source}: cannot load {name}{':' + config if config else ''} split {split} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                         "without a network use a local file") from None
    return ((f"{source}:row {i}", dict(r)) for i, r in enumerate(data))


def fewshot_pool(source: str, fewshot_source: str, shots: int) -> tuple[list[ChoiceQuestion], int]:
    """(the solved examples few-shot prompts draw from, how many leading rows of `source` they take up).

    fewshot_source if given; for hf: names the split the harness draws from (MMLU, C-Eval and CMMLU: dev;
    ARC and HellaSwag: train); otherwise the first `shots` rows of the file itself, which are then not scored.
    """
    if shots == 0:
        return [], 0
    if fewshot_source:
        return read_choice_questions(fewshot_source), 0
    if source.startswith("hf:"):
        name, config, _ = _hf_spec(source)
        split = HF_CHOICE_SPLITS.get(name, (None, "train"))[1]
        return [parse_choice_row(r, w, config) for w, r in _hf_rows(source, split)], 0
    return read_choice_questions(source, limit=shots), shots


def choice_contexts(questions: list[ChoiceQuestion], pool: list[ChoiceQuestion], shots: int,
                    seed: int = 1234) -> list[str]:
    """Each question's context as lm-evaluation-harness 0.4's fewshot_context writes it: description, then
    `shots` solved examples ("query answer\\n\\n" each), then the query. Examples: the pool's first ones for
    MMLU, C-Eval and CMMLU (the harness's first_n sampler), else drawn at random from the pool by one
    random.Random(seed) over the questions in order (its default sampler and seed)."""
    if shots > len(pool):
        raise ValueError(f"--shots {shots}: only {len(pool)} examples to draw from")
    rnd = random.Random(seed)
    contexts = []
    for q in questions:
        examples = pool[:shots] if q.layout in FIRST_N_LAYOUTS else rnd.sample(pool, shots) if shots else []
        contexts.append(q.description + "".join(f"{e.query} {e.choices[e.gold]}\n\n" for e in examples) + q.query)
    return contexts


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(tokens of context + continuation, how many of them are the continuation's), as the harness encodes a
    loglikelihood request: trailing whitespace of the context moves to the continuation, and the continuation's
    tokens are tokens(context + continuation) after the first len(tokens(context)). An empty context becomes
    <|endoftext|>."""
    if not context:
        ids = tokenizer.encode(continuation)
        return [tokenizer.eot_id, *ids], len(ids)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    return whole, len(whole) - len(tokenizer.encode(context))


def option_loglikelihoods(model, tokenizer, questions: list[ChoiceQuestion], contexts: list[str],
                          batch_size: int = 16, progress: bool = False) -> list[list[float]]:
    """Each question's options' summed log-likelihoods (" " + option, given its context)."""
    requests = [encode_pair(tokenizer, ctx, " " + c) for q, ctx in zip(questions, contexts) for c in q.choices]
    scores = iter(loglikelihoods(model, requests, tokenizer.pad_id, batch_size, "scoring" if progress else None))
    return [[next(scores)[0] for _ in q.choices] for q in questions]


def choice_metrics(questions: list[ChoiceQuestion], lls: list[list[float]]) -> dict:
    """acc, acc_norm (log-likelihood / option length in characters), acc_bytes (/ UTF-8 bytes) and n; the first
    of equal options wins (numpy argmax), as in the harness."""
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for q, ll in zip(questions, lls):
        ll = np.array(ll)
        hits["acc"].append(np.argmax(ll) == q.gold)
        hits["acc_norm"].append(np.argmax(ll / np.array([len(c) for c in q.choices])) == q.gold)
        hits["acc_bytes"].append(np.argmax(ll / np.array([len(c.encode("utf-8")) for c in q.choices])) == q.gold)
    return {**{k: float(np.mean(v)) for k, v in hits.items()}, "n": len(questions)}


# ----------------------------------------------------------------------------- eval.py's tasks
TASKS = ("perplexity", "storyworld", "choice", "generate")
DEFAULT_DATA = {"perplexity": "data/storyworld/val.bin", "storyworld": "data/storyworld/sft_val.jsonl"}


@dataclass
class TaskOptions:
    """How a task reads its data and runs (eval.py's flags, besides the checkpoints and the task)."""

    data: str = option("perplexity: a .bin from prepare.py, or a .txt/.jsonl/.parquet file or hf:NAME of documents; "
                       "storyworld: chats (.jsonl); choice: .csv/.jsonl or hf:NAME[:CONFIG][@SPLIT]; generate: "
                       "{prompt, answer} .jsonl. '' = data/storyworld/val.bin (perplexity), "
                       "data/storyworld/sft_val.jsonl (storyworld)", default="")
    shots: int = option("choice: solved examples before each question (few-shot)", default=0)
    fewshot_data: str = option("choice: where the examples come from; '' = the harness's split for hf: names "
                               "(dev or train), else the first --shots rows of --data (then not scored)", default="")
    limit: int = option("at most this many questions, chats or documents; 0 = all", default=0)
    max_tokens: int = option("perplexity: score at most this many tokens; 0 = all", default=0)
    text_field: str = option("perplexity: the field (.jsonl, hf:) or column (.parquet) holding the text",
                             default="text")
    batch_size: int = option("sequences per forward pass", default=16)
    max_new_tokens: int = option("storyworld, generate: longest greedy answer, in tokens", default=64)
    mode: str = option("generate: 'chat' (prompts through the chat template), 'text' (plain continuation, up to "
                       "the first line end) or 'auto' (text for pretraining checkpoints)", default="auto")

    def __post_init__(self):
        self.validate()

    def validate(self):
        """One-line ValueErrors for options that cannot work (eval.py's config extends this)."""
        check_options(self, [("shots", self.shots >= 0, "must be >= 0"),
                             *((name, getattr(self, name) >= 0, "must be >= 0 (0 = all)") for name in (
                                 "limit", "max_tokens")),
                             *((name, getattr(self, name) >= 1, "must be >= 1") for name in (
                                 "batch_size", "max_new_tokens")),
                             ("mode", self.mode in ("auto", "chat", "text"), "must be auto, chat or text")])


@torch.no_grad()
def evaluate_task(model, tokenizer, task: str, opts: TaskOptions, stage: str | None = None,
                  progress: bool = False) -> tuple[dict, list[dict]]:
    """(metrics, the items with the model's answers) of one task, for a model in eval mode trained by `stage`.
    Bad data raises a one-line ValueError or FileNotFoundError naming the file (and line)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    data = opts.data or DEFAULT_DATA.get(task, "")
    if not data:
        raise ValueError(f"--task {task} needs --data FILE (or hf:NAME)")
    if task == "perplexity":
        sequences = perplexity_sequences(data, tokenizer, opts.max_tokens, opts.text_field, opts.limit)
        return perplexity(model, tokenizer, sequences, opts.batch_size, progress), []
    if task == "storyworld":
        chats = load_chats(data)[0][:opts.limit or None]
        if not chats:
            raise ValueError(f"{data}: no chats")
        return storyworld_accuracy(model, tokenizer, chats, opts.max_new_tokens, opts.batch_size, progress)
    if task == "generate":
        prompts, answers = read_prompt_answers(data)
        prompts, answers = prompts[:opts.limit or None], answers[:opts.limit or None]
        if opts.mode == "chat" or (opts.mode == "auto" and stage not in ("pretrain", None)):
            replies = greedy_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                     opts.max_new_tokens, opts.batch_size, progress)
        else:
            replies = greedy_text_continuations(model, tokenizer, prompts, opts.max_new_tokens, opts.batch_size,
                                                progress)
        samples = [{"question": p, "expected": a, "reply": r} for p, a, r in zip(prompts, answers, replies)]
        return score_answers(replies, answers), samples
    pool, skip = fewshot_pool(data, opts.fewshot_data, opts.shots)
    questions = read_choice_questions(data, limit=opts.limit + skip if opts.limit else 0)[skip:]
    if not questions:
        raise ValueError(f"{data}: no questions left after the {skip} used as few-shot examples")
    contexts = choice_contexts(questions, pool, opts.shots)
    lls = option_loglikelihoods(model, tokenizer, questions, contexts, opts.batch_size, progress)
    samples = [{"question": ctx, "choices": q.choices, "gold": q.gold, "loglikelihoods": ll}
               for q, ctx, ll in zip(questions, contexts, lls)]
    return choice_metrics(questions, lls), samples


def write_results(path, results: list[dict]) -> None:
    """The results as a JSON list (NaN, for a group without samples, becomes null)."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in results]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
