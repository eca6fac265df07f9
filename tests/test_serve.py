"""serve.py: the official openai client against the server, errors, limits, disconnects, and the web chat in a browser.

The server runs in this process (uvicorn in a thread, on a free port) with a tiny random checkpoint. The expected
answers come from GPT.generate on the same ids, independently of the server and its batching engine.
"""

import json
import random
import shutil
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

import bench_serve
import checkpoint
from configs import ModelConfig
from model import GPT
from serve import ServeConfig, create_app, load_server
from tests.helpers import TINY_MODEL

MODEL_ID = "nanollm-sft"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY_MODEL, "max_seq_len": 128}))
    return checkpoint.save_checkpoint(tmp_path_factory.mktemp("serve") / "sft", model, tokenizer, {"stage": "sft"})


@contextmanager
def running_server(ckpt, **options):
    """A server for ckpt on 127.0.0.1 and a free port: yields (base URL, the Server)."""
    server = load_server(ServeConfig(checkpoint=str(ckpt), **options))
    app_server = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    while not app_server.started:
        time.sleep(0.01)
    port = app_server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        app_server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(ckpt):
    with running_server(ckpt) as (url, server):
        yield url, server


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def expected(ckpt, tokenizer, ids, max_tokens, stops=(), **sampling):
    """(text, finish_reason, tokens) computed without the server: GPT.generate, cut at the stop tokens."""
    model = GPT.from_pretrained(ckpt).eval()
    out = model.generate(torch.tensor([ids]), max_tokens, **sampling)[0, len(ids):].tolist()
    ends = [i for i, t in enumerate(out) if t in (tokenizer.im_end_id, tokenizer.eot_id)]
    tokens = out[:ends[0]] if ends else out
    return tokenizer.decode(tokens), "stop" if ends else "length", len(tokens)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has a cat. Who has a cat?"}]


def test_models_health_and_chat_page(served, client):
    url, _ = served
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).owned_by == "nanollm"
    health = httpx.get(url + "/health").json()
    assert health == {"status": "ok", "model": MODEL_ID, "active": 0, "waiting": 0, "slots": 16}
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "<textarea" in page.text


def test_chat_completion_is_the_greedy_generation(ckpt, tokenizer, client):
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=12)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    text, finish, n = expected(ckpt, tokenizer, ids, 12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL_ID
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == finish and reply.choices[0].index == 0
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), n)
    assert reply.usage.total_tokens == len(ids) + n


def test_streamed_chat_is_the_same_reply_in_pieces(client):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, temperature=0.7, seed=3, max_tokens=15)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content and len([p for p in pieces if p]) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completions_n_choices_with_a_seed(ckpt, tokenizer, client):
    prompt = "Tom has a"
    ids = tokenizer.encode(prompt)
    reply = client.completions.create(model=MODEL_ID, prompt=prompt, n=2, seed=7, max_tokens=10, temperature=1)
    assert reply.object == "text_completion" and [c.index for c in reply.choices] == [0, 1]
    for j, choice in enumerate(reply.choices):  # choice j samples with seed 7 + j
        text, finish, _ = expected(ckpt, tokenizer, ids, 10, temperature=1.0,
                                   generator=torch.Generator().manual_seed(7 + j))
        assert (choice.text, choice.finish_reason) == (text, finish)
    assert reply.choices[0].text != reply.choices[1].text
    assert reply.usage.prompt_tokens == len(ids)  # the prompt is counted once for n choices
    streamed = client.completions.create(model=MODEL_ID, prompt=prompt, n=2, seed=7, max_tokens=10, temperature=1,
                                         stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in reply.choices]
    several = client.completions.create(model=MODEL_ID, prompt=["Mia", "Ben has"], max_tokens=4, temperature=0)
    assert [c.text for c in several.choices] == [expected(ckpt, tokenizer, tokenizer.encode(p), 4, temperature=0)[0]
                                                 for p in ("Mia", "Ben has")]
    empty = client.completions.create(model=MODEL_ID, prompt="", max_tokens=4, temperature=0)  # a new document
    assert empty.choices[0].text == expected(ckpt, tokenizer, [tokenizer.eot_id], 4, temperature=0)[0]


def test_stop_strings_cut_the_text(client):
    kwargs = dict(model=MODEL_ID, prompt="Lily has a", max_tokens=30, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[10:13]
    assert len(full) > 13 and stop
    cut = client.completions.create(**kwargs, stop=[stop, "never appears"]).choices[0]
    assert (cut.text, cut.finish_reason) == (full[:full.find(stop)], "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stop=stop, stream=True))
    assert streamed == cut.text


BAD_REQUESTS = [  # (path, body, status, words the message must contain)
    ("/v1/chat/completions", b"{not json", 400, "parse the JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "object"),
    ("/v1/chat/completions", {"model": MODEL_ID}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user"}]}, 400, "content"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "temprature": 1},
     400, "temprature"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-4"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "temperature": "0.5"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "n": 100}, 400, "n must be at most"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi " * 200}, 400, "maximum context length"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi " * 60, "max_tokens": 100}, 400, "maximum context length"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": [1, 2, 3]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": []}, 400, "prompt"),
    ("/v1/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,words", BAD_REQUESTS)
def test_bad_requests_get_openai_error_json(served, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(served[0] + path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="gpt-4o") as missing:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert missing.value.code == "model_not_found"


def test_api_key_is_required_when_set(ckpt):
    with running_server(ckpt, api_key="s3cret") as (url, _):
        for key in ("wrong", "s3cret2"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list()
        assert httpx.post(url + "/v1/completions", json={"model": MODEL_ID, "prompt": "x"}).status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL_ID, prompt="Tom", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(url + "/health").status_code == 200  # health and the page stay open


def test_a_full_queue_answers_429(ckpt):
    with running_server(ckpt, max_batch=1, max_queue=1) as (url, server):
        engine, gate = server.engine, threading.Event()
        step = engine.step
        engine.step = lambda: (gate.wait(), step())  # hold the engine: the first request stays queued
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        first = {}
        waiter = threading.Thread(target=lambda: first.update(
            reply=client.completions.create(model=MODEL_ID, prompt="Tom", max_tokens=3)))
        waiter.start()
        while engine.load()["waiting"] < 1:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as busy:
            client.completions.create(model=MODEL_ID, prompt="Mia", max_tokens=3)
        assert busy.value.status_code == 429 and busy.value.body["code"] == "rate_limit_exceeded"
        gate.set()
        waiter.join(timeout=30)
        assert first["reply"].usage.completion_tokens == 3  # the queued request is answered once there is room


def test_a_failing_generation_step_fails_its_requests_only(served, client, monkeypatch):
    url, server = served
    model, fail = server.engine.model, {"left": 2}
    forward = model.forward

    def failing_forward(*args, **kwargs):
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing_forward)
    with pytest.raises(openai.InternalServerError, match="Generation failed"):
        client.completions.create(model=MODEL_ID, prompt="Tom", max_tokens=3)
    events = [json.loads(line[6:]) for line in httpx.post(url + "/v1/completions", json={
        "model": MODEL_ID, "prompt": "Tom", "max_tokens": 3, "stream": True}).text.splitlines() if line]
    assert events[-1]["error"]["type"] == "server_error"  # a stream that has begun ends with an error event
    assert client.completions.create(model=MODEL_ID, prompt="Tom", max_tokens=3).usage.completion_tokens == 3


def wait_until_idle(url, seconds: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if httpx.get(url + "/health").json()["active"] == 0:
            return time.perf_counter() - start
        time.sleep(0.02)
    raise AssertionError(f"a slot is still busy after {seconds} s")


def test_a_client_that_goes_away_frees_its_slot(served, monkeypatch):
    url, server = served
    step = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: (time.sleep(0.02), step()))  # 100 tokens take > 2 s
    body = {"model": MODEL_ID, "prompt": "Tom", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(3)]  # a few tokens arrive, then the client hangs up
    assert wait_until_idle(url, 1.5) < 1.5
    with pytest.raises(httpx.ReadTimeout):  # a whole answer: the client gives up waiting
        httpx.post(url + "/v1/completions", json=body, timeout=0.3)
    assert wait_until_idle(url, 1.5) < 1.5


def random_value(rng: random.Random, depth: int = 0):
    kinds = [None, True, -1, 0, 2 ** 70, 1e308, -0.5, float("nan"), "", "x" * rng.randint(1, 3000), "\udcff"[:0],
             "<|im_end|>", [], {}]
    if depth < 2:
        kinds += [[random_value(rng, depth + 1)], {"role": random_value(rng, depth + 1), "content": "hi"}]
    return rng.choice(kinds)


def malformed(rng: random.Random, valid: dict) -> tuple[str, str, bytes]:
    """A random bad request: a field dropped, retyped or invented, broken JSON, or a wrong method or path."""
    body = json.loads(json.dumps(valid))
    kind = rng.randrange(6)
    if kind == 0:
        body.pop(rng.choice(list(body)))
    elif kind == 1:
        body[rng.choice(list(body) + ["messages", "n", "stop", "seed", "top_k"])] = random_value(rng)
    elif kind == 2:
        body[rng.choice(["tools", "logprobs", "functions", "x" * 50, ""])] = random_value(rng)
    elif kind == 3:
        body["messages"][0][rng.choice(["role", "content", "name", "extra"])] = random_value(rng)
    raw = json.dumps(body, allow_nan=True).encode()
    if kind == 4:
        raw = raw[:rng.randrange(len(raw))] if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(40))
    method, path = "POST", rng.choice(["/v1/chat/completions", "/v1/completions"])
    if kind == 5:
        method, path = rng.choice([("GET", path), ("PUT", path), ("POST", "/v1/models"), ("POST", "/v2/chat"),
                                   ("DELETE", "/health"), ("POST", "/v1/chat/completions/../../etc/passwd")])
    return method, path, raw


def test_hundreds_of_malformed_requests_then_a_correct_answer(ckpt, tokenizer):
    with running_server(ckpt, max_tokens=12) as (url, server):  # a request that happens to be valid is short
        send_malformed_requests(url, 300)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=12)
        ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
        assert reply.choices[0].message.content == expected(ckpt, tokenizer, ids, 12, temperature=0)[0]
        assert wait_until_idle(url, 5) < 5 and server.engine.load()["waiting"] == 0


def send_malformed_requests(url: str, n: int):
    """n random bad requests: none may get a 5xx, most must get a 4xx with OpenAI's error JSON."""
    rng = random.Random(0)
    valid = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    statuses = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(n):
            method, path, raw = malformed(rng, valid)
            response = http.request(method, path, content=raw, headers={"Content-Type": "application/json"})
            statuses.append(response.status_code)
            assert response.status_code < 500, (method, path, raw[:200], response.text)
            if response.status_code >= 400:
                assert "message" in response.json()["error"]
    assert sum(400 <= s < 500 for s in statuses) > 0.8 * n


def test_bench_serve_measures_both_servers(ckpt):
    cfg = bench_serve.BenchServeConfig(checkpoint=str(ckpt), clients="1,3", requests=1, max_tokens=4, rounds=1)
    rows = {(r["server"], r["clients"]): r for r in bench_serve.main(cfg)["rows"]}
    assert set(rows) == {(server, c) for server in ("batched", "one at a time") for c in (1, 3)}
    for (_, clients), row in rows.items():
        assert row["requests"] == clients and row["tokens_per_s"] > 0
        assert 0 < row["ttft_p50_s"] <= row["latency_p50_s"] <= row["latency_p99_s"]


# ----------------------------------------------------------------------------- the web chat in a real browser
def chromium_driver(profile_dir):
    """A headless Chromium under selenium with a fresh profile in profile_dir, or the reason there is none."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return None, f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    try:
        from selenium import webdriver
    except ImportError:
        return None, "selenium is not installed (pip install -r requirements-test.txt)"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # Headless without a sandbox (containers run as root), and none of the background connections a closed
    # network would refuse.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,700", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service), None


def test_web_chat_streams_answers_in_a_browser(ckpt, tokenizer, served, tmp_path):
    driver, why_not = chromium_driver(tmp_path / "chromium-profile")
    if driver is None:
        pytest.skip(why_not)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ask(question: str) -> str:
        driver.find_element(By.ID, "input").send_keys(question + "\n")
        n = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(
            By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == n)
        return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].get_attribute("textContent")

    try:
        driver.get(served[0] + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL_ID)
        for field, value in (("temperature", "0"), ("max-tokens", "10")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        first = ask("Who has a cat?")
        conversation = [{"role": "user", "content": "Who has a cat?"}]
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        assert first == expected(ckpt, tokenizer, ids, 10, temperature=0)[0]
        second = ask("And a dog?")  # the page sends the whole conversation
        conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "And a dog?"}]
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        assert second == expected(ckpt, tokenizer, ids, 10, temperature=0)[0]
        assert "tokens/s" in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")[-1].text
        driver.find_element(By.ID, "new-chat").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        driver.quit()
