"""eval.py and evals.py: log-likelihoods against transformers and lm-evaluation-harness, perplexity and bits per byte
against transformers, the multiple-choice layouts and prompts, answer scoring, bad input and the command line."""

import json
import math
import random

import numpy as np
import pytest
import torch

import checkpoint
import eval as eval_cli
import evals
from configs import ModelConfig
from dataset import DataError
from hf import to_transformers
from model import GPT
from storyworld import generate_preference_pairs
from tests.helpers import TINY_MODEL, make_chats, sample_text, write_jsonl

# Six ARC questions in Hugging Face's layout; the options differ in length, so acc and acc_norm can differ.
ARC_ROWS = [{"id": f"q{i}", "question": f"Which thing does {name} have?",
             "choices": {"text": ["a ball", "a cat", "the kite", "cake"], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i, name in enumerate(["Tom", "Mia", "Ben", "Lily", "Tom", "Mia"])]
MMLU_ROWS = [{"question": f"What does {name} have? ", "subject": "high_school_biology",
              "choices": ["a ball", "a cat", "a kite", "a cake"], "answer": i % 4}
             for i, name in enumerate(["Tom", "Mia", "Ben", "Lily", "Tom"])]
HELLASWAG_ROWS = [{"activity_label": "Playing ball", "ctx_a": f"{name} has a ball.", "ctx_b": "the ball",
                   "endings": ["is red. [title] Red", "is a cat.", "is [step] red.", "has a kite."],
                   "label": str(i % 4)} for i, name in enumerate(["Tom", "Mia", "Ben"])]


@pytest.fixture(scope="module")
def model(tokenizer):
    """A random tiny model: 32 tokens of context, so few-shot prompts get cut from the left."""
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **TINY_MODEL)).eval()


def hf_logprob(hf, tokens: list[int], n: int) -> float:
    """transformers' summed log-probability of the last n of tokens."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([tokens[:-1]])).logits[0, -n:].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[-n:])[:, None]).sum().item()


# ----------------------------------------------------------------------------- exactness
def test_option_loglikelihoods_equal_transformers(model, tokenizer):
    pytest.importorskip("transformers")
    hf = to_transformers(model, "llama").eval()
    questions = [evals.parse_choice_row(r, "arc") for r in ARC_ROWS]
    contexts = evals.choice_contexts(questions[2:], questions[:2], shots=2)  # ~40 tokens: cut to the last 33
    ours = evals.option_loglikelihoods(model, tokenizer, questions[2:], contexts, batch_size=3)
    for q, context, lls in zip(questions[2:], contexts, ours):
        assert len(tokenizer.encode(context)) > TINY_MODEL["max_seq_len"]
        for choice, ll in zip(q.choices, lls):
            whole = tokenizer.encode(context + " " + choice)
            n = len(whole) - len(tokenizer.encode(context))
            assert ll == pytest.approx(hf_logprob(hf, whole[-33:], n), abs=1e-4)


def hf_tokenizer_like(tokenizer):
    """A transformers tokenizer with the fixture tokenizer's ids (the same BPE, trained again; specials after it)."""
    from transformers import PreTrainedTokenizerFast

    from tokenizer import PAD, SPECIAL_TOKENS, train_hf_bpe

    fast = PreTrainedTokenizerFast(tokenizer_object=train_hf_bpe(sample_text(), 320))
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    fast.eos_token, fast.pad_token = SPECIAL_TOKENS[0], PAD
    text = "Question: Which thing does Lily have?\nAnswer: the kite 你好"
    assert fast.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert fast.eos_token_id == tokenizer.eot_id
    return fast


def test_choice_tasks_match_lm_evaluation_harness(model, tokenizer, tmp_path, monkeypatch):
    """ARC (2 shots, the harness's random sampler), MMLU (2 shots from dev, first_n, subject description) and
    HellaSwag (its preprocessing), run by lm-evaluation-harness 0.4 itself on the same weights, offline."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.hellaswag.utils import process_docs

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in [
        ("arc_train", ARC_ROWS[:4]), ("arc_test", ARC_ROWS[2:]), ("mmlu_dev", MMLU_ROWS[:2]),
        ("mmlu_test", MMLU_ROWS[2:]), ("hellaswag_val", HELLASWAG_ROWS)]}
    metrics = [{"metric": m} for m in ("acc", "acc_norm", "acc_bytes")]

    def local(*splits):
        return {"dataset_path": "json", "output_type": "multiple_choice", "metric_list": metrics,
                "dataset_kwargs": {"data_files": {split: str(files[name]) for split, name in splits}}}

    tasks = [
        {**local(("train", "arc_train"), ("test", "arc_test")), "task": "t_arc", "training_split": "train",
         "test_split": "test", "doc_to_text": "Question: {{question}}\nAnswer:", "num_fewshot": 2,
         "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}"},
        {**local(("dev", "mmlu_dev"), ("test", "mmlu_test")), "task": "t_mmlu", "test_split": "test",
         "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}, "num_fewshot": 2,
         "description": "The following are multiple choice questions (with answers) about high school biology.\n\n",
         "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                        "D. {{choices[3]}}\nAnswer:", "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer"},
        {**local(("validation", "hellaswag_val")), "task": "t_hellaswag", "validation_split": "validation",
         "process_docs": process_docs, "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
         "doc_to_choice": "choices"},
    ]
    lm = HFLM(pretrained=to_transformers(model, "llama").eval(), tokenizer=hf_tokenizer_like(tokenizer), batch_size=4,
              max_length=TINY_MODEL["max_seq_len"], device="cpu")
    theirs = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True,
                                     task_manager=TaskManager(include_defaults=False))  # no scan of its 1000s of tasks
    ours_options = {"t_arc": (files["arc_test"], files["arc_train"], 2), "t_mmlu": (files["mmlu_test"],
                    files["mmlu_dev"], 2), "t_hellaswag": (files["hellaswag_val"], "", 0)}
    for task, (data, fewshot, shots) in ours_options.items():
        opts = evals.TaskOptions(data=str(data), fewshot_data=str(fewshot), shots=shots, batch_size=3)
        results, samples = evals.evaluate_task(model, tokenizer, "choice", opts)
        their_samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(their_samples) == results["n"]
        for ours, their in zip(samples, their_samples):
            assert ours["loglikelihoods"] == pytest.approx([r[0][0] for r in their["resps"]], abs=1e-4)
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert results[metric] == theirs["results"][task][f"{metric},none"]


def test_perplexity_and_bits_per_byte_equal_transformers(model, tokenizer, tmp_path, data_dir):
    pytest.importorskip("transformers")
    hf = to_transformers(model, "llama").eval()
    docs = ["Tom has a ball.", "Mia has a cat. The cat is red.", "Lily 有一只小猫。"]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    nats = sum(-hf_logprob(hf, [tokenizer.eot_id, *tokenizer.encode(d)], len(tokenizer.encode(d))) for d in docs)
    tokens = sum(len(tokenizer.encode(d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    for name in ("docs.txt", "docs.jsonl"):
        got, _ = evals.evaluate_task(model, tokenizer, "perplexity", evals.TaskOptions(data=str(tmp_path / name)))
        assert (got["tokens"], got["bytes"]) == (tokens, n_bytes)
        assert got["loss"] == pytest.approx(nats / tokens, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    # A prepared .bin: one stream, its first token is context; <|endoftext|> is scored but has no bytes.
    stream = np.fromfile(data_dir / "val.bin", dtype=np.uint16)[:31].tolist()
    got, _ = evals.evaluate_task(model, tokenizer, "perplexity",
                                 evals.TaskOptions(data=str(data_dir / "val.bin"), max_tokens=30))
    n_bytes = sum(len(tokenizer.enc.decode_single_token_bytes(t)) for t in stream[1:] if t != tokenizer.eot_id)
    assert (got["tokens"], got["bytes"]) == (30, n_bytes)
    assert got["loss"] == pytest.approx(-hf_logprob(hf, stream, 30) / 30, rel=1e-5)


def test_rolling_windows_score_every_token_once_as_the_harness_does():
    tokens = list(range(100, 175))  # the first is context only
    windows = evals.rolling_windows(tokens, max_len=32)
    scored = [t for window, n in windows for t in window[-n:]]
    assert scored == tokens[1:] and all(len(w) <= 33 for w, _ in windows)
    assert all(len(w) == 33 for w, _ in windows[1:])  # later windows are filled with the tokens before them
    utils = pytest.importorskip("lm_eval.utils")
    theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens[1:], tokens[0], 32, 1)]
    assert [(w[:-n], w[-n:]) for w, n in windows] == [(list(ctx), list(cont)) for ctx, cont in theirs]


def test_encode_pair_moves_trailing_spaces_into_the_continuation(tokenizer):
    whole, n = evals.encode_pair(tokenizer, "Tom has a ", "ball")
    assert whole == tokenizer.encode("Tom has a ball")
    assert tokenizer.decode(whole[-n:]) == " ball" and tokenizer.decode(whole[:-n]) == "Tom has a"
    ball = tokenizer.encode("ball")
    assert evals.encode_pair(tokenizer, "", "ball") == ([tokenizer.eot_id, *ball], len(ball))


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes():
    # sums -2, -4, -5; per character (1, 4, 2) -2, -1, -2.5; per UTF-8 byte (1, 4, 6) -2, -1, -0.83
    lls = [-2.0, -4.0, -5.0]
    for gold, expected in ((0, (1.0, 0.0, 0.0)), (1, (0.0, 1.0, 0.0)), (2, (0.0, 0.0, 1.0))):
        q = evals.ChoiceQuestion("q", ["a", "bbbb", "日本"], gold, "arc")
        got = evals.choice_metrics([q], [lls])
        assert (got["acc"], got["acc_norm"], got["acc_bytes"]) == expected
    tie = evals.ChoiceQuestion("q", ["x", "y"], 0, "arc")
    assert evals.choice_metrics([tie], [[-1.0, -1.0]])["acc"] == 1.0  # the first of equals, as numpy's argmax


# ----------------------------------------------------------------------------- layouts and prompts
def write_csv(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_layout_reads_into_the_harness_prompt(tmp_path):
    chinese = "下列哪个是水果？\nA. 苹果\nB. 石头\nC. 桌子\nD. 汽车\n答案："
    ceval = write_csv(tmp_path / "fruit_val.csv", ["id,question,A,B,C,D,answer,explanation",
                                                   "0,下列哪个是水果？,苹果,石头,桌子,汽车,A,苹果是水果"])
    cmmlu = write_csv(tmp_path / "fruit.csv", [",Question,A,B,C,D,Answer", "0,下列哪个是水果？ ,苹果,石头,桌子,汽车,A"])
    mmlu_csv = write_csv(tmp_path / "elementary_mathematics_test.csv", ['"What is 2+2?",3,4,5,6,B'])
    mmlu_jsonl = write_jsonl(tmp_path / "m.jsonl", [{"question": "What is 2+2?", "subject": "elementary_mathematics",
                                                     "choices": ["3", "4", "5", "6"], "answer": 1}])
    arc_hf = write_jsonl(tmp_path / "arc.jsonl", [{"question": "Pick one", "answerKey": "2",
                                                   "choices": {"text": ["x", "y"], "label": ["1", "2"]}}])
    arc_ai2 = write_jsonl(tmp_path / "ARC-Easy-Test.jsonl", [{"question": {"stem": "Pick one", "choices": [
        {"text": "x", "label": "1"}, {"text": "y", "label": "2"}]}, "answerKey": "2"}])
    hellaswag = write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG_ROWS[:1])
    maths = "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    letters, maths_query, arc_query = ["A", "B", "C", "D"], "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", \
        "Question: Pick one\nAnswer:"
    expected = {
        ceval: (chinese, letters, 0, ""), cmmlu: (chinese, letters, 0, ""),
        mmlu_csv: (maths_query, letters, 1, maths), mmlu_jsonl: (maths_query, letters, 1, maths),
        arc_hf: (arc_query, ["x", "y"], 1, ""), arc_ai2: (arc_query, ["x", "y"], 1, ""),
        # HellaSwag's cleaning: " [title]" becomes ". ", other [tags] go, double spaces become one
        hellaswag: ("Playing ball: Tom has a ball. The ball", ["is red.. Red", "is a cat.", "is red.", "has a kite."],
                    0, ""),
    }
    for path, (query, choices, gold, description) in expected.items():
        [q] = evals.read_choice_questions(str(path))
        assert (q.query, q.choices, q.gold, q.description) == (query, choices, gold, description), path.name


def test_few_shot_contexts_first_n_or_seeded_random(tmp_path):
    mmlu = [evals.parse_choice_row(r, "m") for r in MMLU_ROWS]
    [context] = evals.choice_contexts(mmlu[4:], mmlu[:3], shots=2)
    options = "A. a ball\nB. a cat\nC. a kite\nD. a cake\nAnswer:"
    assert context == (mmlu[4].description + f"What does Tom have?\n{options} A\n\nWhat does Mia have?\n{options} B\n\n"
                       + mmlu[4].query)
    arc = [evals.parse_choice_row(r, "a") for r in ARC_ROWS]
    contexts = evals.choice_contexts(arc[4:], arc[:4], shots=2)
    rnd = random.Random(1234)  # the harness's default sampler: one seeded stream, question by question
    for q, context in zip(arc[4:], contexts):
        shots = rnd.sample(arc[:4], 2)
        assert context == "".join(f"{s.query} {s.choices[s.gold]}\n\n" for s in shots) + q.query
    # Without --fewshot_data, a local file's first rows are the examples and are not scored.
    path = write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)
    pool, skip = evals.fewshot_pool(str(path), "", shots=2)
    assert skip == 2 and [q.query for q in pool] == [q.query for q in arc[:2]]


# ----------------------------------------------------------------------------- answers
def test_question_types_are_read_back_from_storyworld_questions():
    pairs = generate_preference_pairs(300, seed=0)
    assert all(evals.question_type(p["prompt"]) == p["fact"] for p in pairs)
    assert len({p["fact"] for p in pairs}) >= 10
    assert evals.question_type("Story.\n\nWhy is the sky blue?") == "other"


def test_answers_scored_by_exact_match_and_containment_per_group():
    replies = ["lily found a red ball", "I think Tom went to the park!", "小明去了公园。", "Mia"]
    answers = ["Lily found a red ball.", "Tom went to the park.", "小明去了公园", "Ben"]
    got = evals.score_answers(replies, answers, {"lang": ["en", "en", "zh", "en"]})
    assert got == {"acc": 0.5, "contains": 0.75, "n": 4, "acc_en": pytest.approx(1 / 3), "acc_zh": 1.0}


def test_storyworld_and_generate_tasks_report_accuracy_by_language_and_type(model, tokenizer, tmp_path):
    chats = [{"conversations": [{"role": "user", "content": "Tom has a ball.\n\nWho helped Tom?"},
                                {"role": "assistant", "content": "Mom helped Tom."}]},
             {"conversations": [{"role": "user", "content": "小明有球。\n\n小明吃了什么？"},
                                {"role": "assistant", "content": "小明吃了苹果。"}]}]
    results, samples = evals.evaluate_task(model, tokenizer, "storyworld",
                                           evals.TaskOptions(data=str(write_jsonl(tmp_path / "c.jsonl", chats)),
                                                             max_new_tokens=4), stage="sft")
    assert {"acc", "contains", "n", "acc_en", "acc_zh", "acc_helper", "acc_food"} <= set(results)
    assert results["n"] == 2 and [s["expected"] for s in samples] == ["Mom helped Tom.", "小明吃了苹果。"]
    rows = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Tom has a", "answer": "ball"}])
    for stage in ("pretrain", "sft"):  # a plain-text continuation (one line), then a reply through the chat template
        results, [sample] = evals.evaluate_task(model, tokenizer, "generate",
                                                evals.TaskOptions(data=str(rows), max_new_tokens=3), stage=stage)
        assert results["n"] == 1 and sample["expected"] == "ball" and isinstance(sample["reply"], str)
        assert stage == "sft" or "\n" not in sample["reply"]


# ----------------------------------------------------------------------------- bad input and the command line
@pytest.mark.parametrize("name, lines, message", [
    ("arc.jsonl", [json.dumps(ARC_ROWS[0]), json.dumps({**ARC_ROWS[1], "answerKey": None}) + "x"],
     r"arc.jsonl:2: not valid JSON"),
    ("arc.jsonl", [json.dumps(ARC_ROWS[0]), json.dumps({k: v for k, v in ARC_ROWS[1].items() if k != "answerKey"})],
     r"arc.jsonl:2: arc row without field 'answerKey'"),
    ("h.jsonl", [json.dumps({**HELLASWAG_ROWS[0], "label": "7"})], r"h.jsonl:1: the answer 7 is not one of its 4"),
    ("x.jsonl", [json.dumps({"text": "hello"})], r"x.jsonl:1: no multiple-choice layout has the fields text"),
    ("c_val.csv", ["id,question,A,B,C,D,answer", "0,q,a,b,c,d,A", "1,q,a,b,c,d,E"],
     r"c_val.csv:3: malformed ceval row \(answer 'E' is not A, B, C or D\)"),
    ("m_test.csv", ["q,a,b,c,d,A", "q,a,b,c,A"], r"m_test.csv:2: an MMLU CSV row is question, A, B, C, D, answer"),
])
def test_malformed_rows_name_their_file_and_line(tmp_path, name, lines, message):
    (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        evals.read_choice_questions(str(tmp_path / name))


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, the last line on stderr: progress lines come before it)."""
    rc = eval_cli.main(argv)
    out, err = capsys.readouterr()
    last = (err.splitlines() or [""])[-1]
    assert "Traceback" not in err and (rc == 0 or last.startswith("error: "))
    return rc, out, last


def test_cli_compares_checkpoints_and_writes_json(model, tokenizer, tmp_path, capsys):
    for stage in ("pretrain", "sft"):
        checkpoint.save_checkpoint(tmp_path / stage, model, tokenizer, {"stage": stage, "step": 1})
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in sample_text(5)])
    out = tmp_path / "results.json"
    rc, table, _ = run_cli(["--checkpoint", str(tmp_path / "pretrain"), str(tmp_path / "sft"), "--task", "perplexity",
                            "--data", str(docs), "--out", str(out)], capsys)
    assert rc == 0
    results = json.loads(out.read_text())
    assert [r["checkpoint"] for r in results] == [str(tmp_path / "pretrain"), str(tmp_path / "sft")]
    assert all(r["task"] == "perplexity" and r["perplexity"] == pytest.approx(math.exp(r["loss"])) for r in results)
    assert results[0]["loss"] == results[1]["loss"]  # the same weights
    assert table.splitlines()[0].split() == ["metric", str(tmp_path / "pretrain"), str(tmp_path / "sft")]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["loss", "perplexity", "bits_per_byte", "tokens",
                                                                    "bytes"]
    chats = write_jsonl(tmp_path / "chats.jsonl", make_chats(3, 0))
    rc, table, _ = run_cli(["--checkpoint", str(tmp_path / "sft"), "--task", "storyworld", "--data", str(chats),
                            "--max_new_tokens", "2"], capsys)
    assert rc == 0 and "acc_en" in table and "contains" in table


def test_cli_bad_checkpoints_and_rows_are_one_line_errors(model, tokenizer, tmp_path, capsys):
    rc, _, err = run_cli(["--checkpoint", str(tmp_path / "nowhere"), "--task", "perplexity"], capsys)
    assert rc == 1 and err.startswith("error: ") and "no such checkpoint directory" in err
    checkpoint.save_checkpoint(tmp_path / "broken", model, tokenizer, {"stage": "sft", "step": 1})
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not weights")
    rc, _, err = run_cli(["--checkpoint", str(tmp_path / "broken"), "--task", "perplexity"], capsys)
    assert rc == 1 and "broken checkpoint" in err and "model.safetensors" in err
    checkpoint.save_checkpoint(tmp_path / "ok", model, tokenizer, {"stage": "sft", "step": 1})
    bad = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "c"}])
    rc, _, err = run_cli(["--checkpoint", str(tmp_path / "ok"), "--task", "generate", "--data", str(bad)], capsys)
    assert rc == 1 and f"{bad}:2: needs a string field 'answer'" in err
    rc, _, err = run_cli(["--checkpoint", str(tmp_path / "ok"), "--task", "choice"], capsys)
    assert rc == 1 and "--task choice needs --data" in err
