"""The exact-match rule of the answer accuracy (evals.answer_matches), and what it scores of a reasoning reply."""

import torch

import evals
from evals import answer_matches


def test_answer_matches():
    assert answer_matches("Lily found a red ball.", "Lily found a red ball.")
    assert answer_matches("  lily   found a RED ball ", "Lily found a red ball.")
    assert answer_matches("Lily found a red ball!", "Lily found a red ball.")
    assert answer_matches("小明找到了一个红色的皮球", "小明找到了一个红色的皮球。")
    assert answer_matches("小明找到了一个红色的皮球！ ", "小明找到了一个红色的皮球。")
    assert not answer_matches("Lily found a blue ball.", "Lily found a red ball.")
    assert not answer_matches("Lily found a red ball. Then she ran.", "Lily found a red ball.")
    assert not answer_matches("小明找到了一个蓝色的皮球。", "小明找到了一个红色的皮球。")


def test_answer_accuracy_scores_the_part_after_think(monkeypatch):
    expected = "<think>Tom found a kite in the park.</think>Tom found a kite."
    replies = ["<think>Tom found a kite in the park.</think>Tom found a kite.",  # right
               "<think>Mia found a kite.</think> tom found a kite",  # right: the reasoning is not scored
               "<think>Tom found a kite.",  # never closes <think>: no answer, wrong
               "Tom found a kite.",  # a plain reply is its own answer: right
               "<think>Tom found a kite.</think>Tom found a ball."]  # wrong answer
    monkeypatch.setattr(evals, "greedy_replies", lambda model, tokenizer, prompts, max_new_tokens: replies)
    chats = [[{"role": "user", "content": "Who found a kite?"}, {"role": "assistant", "content": expected}]] * 5
    model = torch.nn.Linear(1, 1)
    assert evals.answer_accuracy(model, None, chats)["answer_acc"] == 3 / 5
