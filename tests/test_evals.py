"""The exact-match rule of the answer accuracy (evals.answer_matches)."""

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
