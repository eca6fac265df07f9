"""Chat evaluations: exact-match answer accuracy on held-out question-answer chats, by greedy generation."""

import re

import torch

from tokenizer import split_think

CJK = re.compile(r"[\u3400-\u9fff]")
FINAL_PUNCTUATION = ".!?,;:。！？，；：…\"'“”‘’ "


def answer_matches(reply: str, expected: str) -> bool:
    """Exact match up to whitespace, case and final punctuation: 'lily found a red ball' == 'Lily found a red ball.'"""

    def normalise(text: str) -> str:
        return " ".join(text.split()).lower().rstrip(FINAL_PUNCTUATION)

    return normalise(reply) == normalise(expected)


def first_question(messages: list[dict]) -> tuple[list[dict], str]:
    """The prompt (system message if any, then the first user turn) and the expected first answer."""
    i = next(i for i, m in enumerate(messages) if m["role"] == "user")
    answer = next(m["content"] for m in messages[i + 1:] if m["role"] == "assistant")
    return messages[:i + 1], answer


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64,
                   batch_size: int = 32) -> list[str]:
    """The model's greedy reply to each chat prompt, generated a batch at a time.

    Prompts are left-padded to a common length; attention_mask keeps the padding out of attention, and
    since RoPE is relative the padding does not shift the real tokens either. Stops at <|im_end|>.
    """
    device = next(model.parameters()).device
    stop_ids = [tokenizer.im_end_id, tokenizer.eot_id]
    replies = []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts[start:start + batch_size]]
        T = max(len(x) for x in ids)
        idx = torch.tensor([[tokenizer.pad_id] * (T - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=device)
        steps = min(max_new_tokens, model.config.max_seq_len - T)  # no sliding window: padding would slide too
        out = model.generate(idx, steps, temperature=0, eos_id=stop_ids, attention_mask=mask)[:, T:]
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            replies.append(tokenizer.decode(row[:cut]))
    return replies


def answer_accuracy(model, tokenizer, records: list[list[dict]], max_new_tokens: int = 64) -> dict[str, float]:
    """Exact-match accuracy of greedy answers to the first question of each held-out chat.

    records are message lists (e.g. from sft_val.jsonl). A reply matches if it equals the expected answer up to
    whitespace, case and final punctuation (answer_matches). In the reasoning format (`<think>…</think>answer`),
    only the part after </think> is scored, of the reply and of the expected answer alike, so a reply that
    never closes its <think> is wrong. Also split by the answer's language
    (Chinese if it contains CJK characters); a language without samples gives nan.
    """
    was_training = model.training
    model.eval()
    prompts, expected = zip(*(first_question(m) for m in records))
    replies = greedy_replies(model, tokenizer, list(prompts), max_new_tokens)
    model.train(was_training)
    hits = {"en": [], "zh": []}
    for reply, answer in zip(replies, expected):
        answer = split_think(answer)[1]
        hits["zh" if CJK.search(answer) else "en"].append(answer_matches(split_think(reply)[1], answer))

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {"answer_acc": mean(hits["en"] + hits["zh"]), "answer_acc_en": mean(hits["en"]),
            "answer_acc_zh": mean(hits["zh"])}
