"""StoryWorld: deterministic, bilingual, and every question answerable from its own story."""

import json
import random
import re

import pytest

import storyworld as sw

N = 400


def _story_of(user_content: str) -> str:
    """The story part of a first user turn or a DPO prompt: everything before the blank line."""
    return user_content.rsplit("\n\n", 1)[0]


def _lang(text: str) -> str:
    return "en" if text.isascii() else "zh"


def _entities_in(text: str, lang: str) -> list[str]:
    """Every pool entity (name, pet, object, colour, place, food, ...) that `text` mentions."""
    pools = [pool for name, pool in sw.WORLD[lang].items() if name not in ("openers", "spots")]
    return [e for pool in pools for e in pool if sw.mentions(text, e, lang)]


def test_same_seed_gives_same_data_other_seed_different():
    for generate in (sw.generate_stories, sw.generate_chats, sw.generate_lessons, sw.generate_preference_pairs):
        assert generate(30, 1) == generate(30, 1)
        assert generate(30, 1) != generate(30, 2)


def test_write_default_dataset_is_byte_identical_for_a_seed(tmp_path):
    small = dict(n_stories=60, n_lessons=40, n_chats=30, n_pairs=30, n_val=10)
    a, b, c = (sw.write_default_dataset(tmp_path / name, seed=seed, **small)
               for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    names = ["pretrain.jsonl", "sft_train.jsonl", "sft_val.jsonl", "dpo_train.jsonl", "dpo_val.jsonl"]
    assert sorted(p.name for p in a.iterdir()) == sorted(names)  # no temp files left behind
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()


def test_about_half_of_the_stories_are_chinese():
    stories = sw.generate_stories(1000, 0)
    share = sum(_lang(s) == "zh" for s in stories) / len(stories)
    assert 0.42 < share < 0.58


def test_stories_have_3_to_8_sentences():
    for story in sw.generate_stories(N, 0):
        ends = r'[.!?]"?(?=\s|$)' if _lang(story) == "en" else r"[。！？]”?"
        assert 3 <= len(re.findall(ends, story)) <= 8, story


def test_pool_entries_do_not_mention_each_other():
    # Otherwise "does the story mention X" would be ambiguous.
    for lang, pools in sw.WORLD.items():
        assert len(pools["names"]) >= 40
        assert not set(pools["names"]) & set(pools["pets"])
        for name, pool in pools.items():
            assert len(set(pool)) == len(pool), (lang, name)
            for a in pool:
                assert not any(a != b and a and sw.mentions(b, a, lang) for b in pool), (lang, name, a)


def test_every_fact_is_answerable_from_its_story():
    rng = random.Random(0)
    for _ in range(N):
        story = sw.sample_story(rng)
        for fact in story.facts:
            value = story.value(fact)
            assert sw.mentions(story.text, value, story.lang), (fact, value, story.text)
            assert sw.mentions(story.answer(fact), value, story.lang)


def test_chats_are_valid_conversations():
    chats = sw.generate_chats(N, 0)
    for chat in chats:
        messages = chat["conversations"]
        assert all(set(m) == {"role", "content"} and m["content"] for m in messages)
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        assert messages[-1]["role"] == "assistant"
    with_system = sum(c["conversations"][0]["role"] == "system" for c in chats) / N
    multi_turn = sum(len(c["conversations"]) - (c["conversations"][0]["role"] == "system") == 4 for c in chats) / N
    assert 0.12 < with_system < 0.28 and 0.12 < multi_turn < 0.28
    json.dumps(chats)  # plain JSON data


def test_lessons_ask_every_fact_of_their_story_once():
    n_facts = {len(shape.facts) for shape in sw.SHAPES}
    for lesson in sw.generate_lessons(N, 3):
        messages = [m for m in lesson["conversations"] if m["role"] != "system"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        story, first = messages[0]["content"].rsplit("\n\n", 1)
        asked = [first] + [m["content"] for m in messages[2::2]]
        assert all("\n" not in q for q in asked) and story not in asked[1]  # the story is told once
        assert len(set(asked)) == len(asked) and len(asked) in n_facts


@pytest.mark.parametrize("generate", [sw.generate_chats, sw.generate_lessons])
def test_chat_answers_copy_their_entities_from_the_story(generate):
    for chat in generate(N, 1):
        user = [m["content"] for m in chat["conversations"] if m["role"] == "user"]
        story, lang = _story_of(user[0]), _lang(user[0])
        for m in chat["conversations"]:
            if m["role"] == "assistant":
                entities = _entities_in(m["content"], lang)
                assert entities, m["content"]
                assert all(sw.mentions(story, e, lang) for e in entities), (m["content"], story)


def test_preference_pairs_reject_a_different_answer():
    pairs = sw.generate_preference_pairs(N, 0)
    unhelpful = {r for replies in sw.UNHELPFUL_REPLIES.values() for r in replies}
    n_unhelpful = n_distractor = 0
    for p in pairs:
        story, lang = _story_of(p["prompt"]), p["lang"]
        assert p["chosen"] != p["rejected"]
        assert sw.mentions(story, p["value"], lang) and sw.mentions(p["chosen"], p["value"], lang)
        if p["rejected"] in unhelpful:
            n_unhelpful += 1
            continue
        assert not sw.mentions(p["rejected"], p["value"], lang)
        wrong = set(_entities_in(p["rejected"], lang)) - set(_entities_in(p["chosen"], lang))
        n_distractor += any(sw.mentions(story, e, lang) for e in wrong)
    assert 0.05 < n_unhelpful / N < 0.25
    assert n_distractor / N > 0.4  # often a wrong entity that the story does mention


def _first_story(chat: dict) -> str:
    return _story_of(next(m["content"] for m in chat["conversations"] if m["role"] == "user"))


def test_val_stories_are_held_out(tmp_path):
    d = sw.write_default_dataset(tmp_path, seed=0, n_stories=300, n_lessons=300, n_chats=200, n_pairs=200, n_val=50)

    def rows(name):
        return [json.loads(line) for line in (d / name).read_text(encoding="utf-8").splitlines()]

    pretrain = rows("pretrain.jsonl")
    assert sum("text" in r for r in pretrain) == sum("conversations" in r for r in pretrain) == 300
    train = {r["text"] if "text" in r else _first_story(r) for r in pretrain}
    train |= {_first_story(r) for r in rows("sft_train.jsonl")}
    train |= {_story_of(r["prompt"]) for r in rows("dpo_train.jsonl")}
    val_chats, val_pairs = rows("sft_val.jsonl"), rows("dpo_val.jsonl")
    assert len(rows("sft_train.jsonl")) == len(rows("dpo_train.jsonl")) == 200
    assert len(val_chats) == len(val_pairs) == 50
    val = {_first_story(r) for r in val_chats} | {_story_of(r["prompt"]) for r in val_pairs}
    assert not train & val
