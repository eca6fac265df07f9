"""Pretrained byte-level BPE tokenizers (tokenizer.HFTokenizer) against transformers' AutoTokenizer: the same ids
on mixed text whatever the pre-tokenizer chain, the same chat-template ids, the assistant mask; our own tokenizer
written as a tokenizer.json; and the tokenizers that are refused."""

import json
import unicodedata

import pytest

from tests.hf_models import STYLES, TEXTS, build_tokenizer, fuzz_texts, save_tokenizer
from tokenizer import IM_END, HFTokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

CHATS = [
    [{"role": "user", "content": "Hi there! 你好 😀"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6\n\ndone, café"}],
    [{"role": "user", "content": "code:\n    def f(): pass"}],
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """style -> (ours, transformers'), each read from the same directory (qwen3's template in its config)."""
    out = {}
    for style in STYLES:
        directory = tmp_path_factory.mktemp(style)
        save_tokenizer(style, directory, template_in_config=style == "qwen3")
        out[style] = Tokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(directory)
    return out


@pytest.mark.parametrize("style", STYLES)
def test_ids_match_transformers_on_mixed_text(tokenizers, style):
    ours, theirs = tokenizers[style]
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS + fuzz_texts(400):
        expected = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, allow_special=True) == expected, text
        # Round trip (up to the normalizer: Qwen's is NFC).
        assert ours.decode(expected) == (unicodedata.normalize("NFC", text) if style.startswith("qwen") else text)


@pytest.mark.parametrize("style", STYLES)
def test_special_tokens_stay_text_unless_allowed_but_plain_added_tokens_always_count(tokenizers, style):
    ours, _ = tokenizers[style]
    specials = set(ours.special_ids.values())
    for text in TEXTS:
        assert not specials & set(ours.encode(text))
    for content in STYLES[style].get("plain", []):  # non-special added tokens, e.g. Qwen's <tool_call>
        assert ours.encode(f"a{content}b") == [*ours.encode("a"), ours.id_of(content), *ours.encode("b")]


def test_ids_out_of_merge_order_go_through_a_rank_mapping(tokenizers):
    assert tokenizers["mistral"][0].rank_to_id is not None  # its vocabulary's ids were shuffled
    # In merge order (SmolLM2's special tokens first only shift them): the ids are tiktoken's ranks.
    assert all(tokenizers[s][0].rank_to_id is None for s in ("gpt2", "smollm2", "llama3", "qwen"))


@pytest.mark.parametrize("style", [s for s in STYLES if STYLES[s].get("template")])
def test_chat_template_ids_match_apply_chat_template(tokenizers, style):
    ours, theirs = tokenizers[style]
    for chat in CHATS:
        if style == "mistral" and chat[0]["role"] == "system":
            with pytest.raises(ValueError, match="roles must alternate"):  # the template's raise_exception
                ours.apply_chat_template(chat)
            continue
        for generation_prompt in (False, True):
            expected = theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, return_dict=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt) == expected


@pytest.mark.parametrize("style", [s for s in STYLES if STYLES[s].get("template")])
def test_assistant_mask_is_each_reply_and_its_turn_end(tokenizers, style):
    ours, _ = tokenizers[style]
    turn_end = {"llama3": "<|eot_id|>", "mistral": "</s>"}.get(style, IM_END)
    assert ours.decode([ours.im_end_id]) == turn_end
    for chat in CHATS[:2] if style != "mistral" else CHATS[:1]:
        ids, mask = ours.apply_chat_template(chat, return_assistant_mask=True)
        assert ids == ours.apply_chat_template(chat)
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        if style == "llama3":  # its template trims each message
            replies = [r.strip() for r in replies]
        trained = ours.decode([i for i, m in zip(ids, mask) if m])
        assert trained == "".join(unicodedata.normalize("NFC", r) + turn_end for r in replies)


def test_a_base_model_without_a_template_gets_chatml(tokenizers, tmp_path):
    ours, _ = tokenizers["gpt2"]
    assert ours.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CHATS[0])
    chat = ours.with_chatml()
    assert (chat.im_start_id, chat.im_end_id) == (ours.vocab_size, ours.vocab_size + 1)
    assert chat.eot_id == ours.eot_id and chat.vocab_size == ours.vocab_size + 2
    chat.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert chat.apply_chat_template(CHATS[1], add_generation_prompt=True) == theirs.apply_chat_template(
        CHATS[1], add_generation_prompt=True, return_dict=False)


def test_our_tokenizer_written_as_tokenizer_json_gives_the_same_ids(tokenizer, tmp_path):
    tokenizer.save_hf(tmp_path, model_max_length=64)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)  # now read as a Hugging Face tokenizer
    assert isinstance(again, HFTokenizer) and again.vocab_size == tokenizer.vocab_size
    for text in TEXTS + fuzz_texts(300):
        ids = tokenizer.encode(text, allow_special=True)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids == again.encode(text, allow_special=True)
    # The template renders our ChatML; whole-text encoding equals ours on ordinary messages.
    for chat in CHATS:
        assert theirs.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == \
            tokenizer.apply_chat_template(chat, add_generation_prompt=True)


def _tokenizer_json(model, pre_tokenizer=None):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = RustTokenizer(getattr(models, model)(**({"byte_fallback": True} if model == "BPE" else {})))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Metaspace()
    trainer = {"BPE": trainers.BpeTrainer, "Unigram": trainers.UnigramTrainer,
               "WordPiece": trainers.WordPieceTrainer}[model](vocab_size=100, show_progress=False)
    tok.train_from_iterator(["hello world", "the model learns"] * 20, trainer)
    return json.loads(tok.to_str())


@pytest.mark.parametrize("model, message", [
    ("Unigram", "a Unigram tokenizer .* is not supported: only byte-level BPE"),
    ("WordPiece", "a WordPiece tokenizer .* is not supported: only byte-level BPE"),
    ("BPE", "SentencePiece-style.* is not supported"),  # Llama 2 / Mistral 7B: Metaspace and byte fallback
])
def test_tokenizers_that_are_not_byte_level_bpe_are_refused(tmp_path, model, message):
    (tmp_path / "tokenizer.json").write_text(json.dumps(_tokenizer_json(model)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_pretrained(tmp_path)


def test_unsupported_pre_tokenizer_step_is_named(tmp_path):
    data = json.loads(build_tokenizer("gpt2").to_str())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, data["pre_tokenizer"]]}
    with pytest.raises(ValueError, match="pre-tokenizer Whitespace"):
        HFTokenizer(data, {"eos_token": "<|endoftext|>"}, None, "x")
