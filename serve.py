"""Serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat at / (chat.html).

    python serve.py                                  # the newest checkpoint under checkpoint/, on 127.0.0.1:8000
    python serve.py --checkpoint checkpoint/sft --port 8080 --api_key secret

POST /v1/chat/completions and POST /v1/completions (with "stream": true as server-sent events), GET /v1/models,
GET /health. Concurrent requests are generated together by engine.py (continuous batching), so many clients
share the model at little more than the cost of one. Requests are checked field by field and answered with
OpenAI's error JSON and a 4xx status; 429 when --max_queue sequences already wait for a slot; a client that
goes away frees its slot at the next step. No request field names a file: the model is the one loaded here.
"""

import asyncio
import json
import math
import secrets
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from configs import QuantizeOption, check_options, device_rules, exit_on_bad_input, option, parse_args
from devices import pick_device, pick_dtype
from engine import Engine, QueueFull, SamplingParams, Sequence
from pretrained import find_checkpoint, load_checkpoint
from tokenizer import StreamDecoder, Tokenizer

CHAT_PAGE = Path(__file__).with_name("chat.html")
MAX_BODY_BYTES = 1 << 20


def info(message: str):
    """Status lines go to stderr (uvicorn's access log goes there too)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class ServeConfig(QuantizeOption):
    checkpoint: str | None = option("checkpoint directory; None = the newest under checkpoint/", default=None)
    host: str = option("address to listen on; 127.0.0.1 = this machine only, 0.0.0.0 = every network",
                       default="127.0.0.1")
    port: int = option("port to listen on", default=8000)
    api_key: str | None = option("require 'Authorization: Bearer API_KEY' on /v1/ (401 otherwise); None = open",
                                 default=None)
    model_name: str | None = option("the model id clients name (GET /v1/models); None = nanollm-<checkpoint "
                                    "directory name>", default=None)
    max_batch: int = option("sequences generated together (rows of the batched KV cache)", default=16)
    max_queue: int = option("sequences that may wait for a free row; more requests get 429", default=64)
    max_tokens: int = option("the most tokens a request may generate (also the default of max_tokens, as far as "
                             "the context allows)", default=512)
    max_n: int = option("the most choices (n) per request", default=8)
    request_timeout: float = option("seconds a request may take, waiting included; then it ends with "
                                    "finish_reason 'length' (or 503 if it never got a slot)", default=600.0)
    device: str = option("'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'mps'", default="auto")
    dtype: str = option("'auto' (bfloat16/float16 on CUDA, else float32), 'float32', 'bfloat16', 'float16'",
                        default="auto")

    def __post_init__(self):
        """One-line ValueErrors for settings that cannot work."""
        check_options(self, [*((name, getattr(self, name) > 0, "must be > 0") for name in (
            "port", "max_batch", "max_queue", "max_tokens", "max_n", "request_timeout")), *device_rules(self)])


# ----------------------------------------------------------------------------- requests (OpenAI's fields)
class Strict(BaseModel):
    """Unknown fields and wrong types are errors (no silent coercion of "0.5" to 0.5)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class GenerationRequest(Strict):
    """The fields both endpoints share. top_k, repetition_penalty and ignore_eos are extensions (as in vLLM)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or "" in stops:
            raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
        return stops

    def penalty(self) -> float:
        """OpenAI's presence and frequency penalties (-2..2) as one CTRL repetition penalty (sampling.py):
        exp((presence + frequency) / 4), so 0 = off, 0.5 -> 1.13, 2 -> 1.65; times repetition_penalty."""
        return self.repetition_penalty * math.exp((self.presence_penalty + self.frequency_penalty) / 4)


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)]


class APIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body}, status_code=self.status)


def is_type_tag(part) -> bool:
    """Whether a part of a pydantic error location names a member of a union ('str', 'list[str]', 'TextPart')
    rather than a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a request, as OpenAI words it where it can."""
    error = e.errors()[0]
    field = ".".join(str(part) for part in error["loc"] if not is_type_tag(part))
    if error["type"] == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({error['msg']})")
    if error["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {field}", param=field)
    if error["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{field}'", param=field)
    return APIError(400, f"Invalid value for '{field or 'body'}': {error['msg']}", param=field or None)


def event(obj: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- text out of tokens
class StopText:
    """One choice's text as its tokens arrive: whole UTF-8 characters only, cut at the first stop string,
    and any tail that could still grow into a stop string held back until it cannot."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.decoder, self.stops = StreamDecoder(tokenizer), stops
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        self.text += self.decoder.push(token)
        return self._release(final=False)

    def flush(self) -> str:
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped, final = self.text[:min(cuts)], True, True
        end = len(self.text)
        if not final:  # hold back the longest tail that a stop string starts with
            end -= max((n for s in self.stops for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece


class Generation:
    """The sequences of one request (n choices of each prompt), read as text in the server's event loop."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, prompts: list[list[int]], params: SamplingParams,
                 n: int, stops: list[str], timeout: float):
        self.engine, self.loop, self.changed = engine, asyncio.get_running_loop(), asyncio.Event()
        # Choice j of a seeded request samples with seed + j: n different answers, each reproducible.
        self.seqs = [Sequence(p, params if params.seed is None else replace(params, seed=params.seed + j),
                              self.wake, timeout) for p in prompts for j in range(n)]
        self.texts = [StopText(tokenizer, stops) for _ in self.seqs]
        self.n_tokens = [0] * len(self.seqs)  # tokens read so far, per choice
        self.prompt_tokens = sum(len(p) for p in prompts)

    def wake(self):  # called by the engine thread
        try:
            self.loop.call_soon_threadsafe(self.changed.set)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    def start(self):
        try:
            for seq in self.seqs:
                self.engine.submit(seq)
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"The server is busy: {e}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded") from None

    def cancel(self):
        for seq in self.seqs:
            if seq.finish_reason is None:
                self.engine.cancel(seq)

    async def events(self):
        """(choice index, new text, finish_reason or None) as the engine generates; 'error' for a failed step."""
        done = [False] * len(self.seqs)
        while not all(done):
            await self.changed.wait()
            self.changed.clear()
            for i, seq in enumerate(self.seqs):
                if done[i]:
                    continue
                reason = seq.finish_reason  # read before the tokens: every token is in once it is set
                tokens = seq.tokens[self.n_tokens[i]:]
                self.n_tokens[i] += len(tokens)
                text = "".join(self.texts[i].push(t) for t in tokens)
                if self.texts[i].stopped:
                    self.engine.cancel(seq)
                    reason = "stop"
                if reason == "timeout" and self.n_tokens[i] == 0:
                    raise APIError(503, "The server is busy: no slot became free within the request timeout",
                                   type="server_error")
                if reason is not None:
                    done[i] = True
                    text += self.texts[i].flush()
                    reason = {"timeout": "length", "cancelled": "stop"}.get(reason, reason)
                if text or reason:
                    yield i, text, reason

    def usage(self) -> dict:
        completion = sum(self.n_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


# ----------------------------------------------------------------------------- the server
class Server:
    """The model, its engine and the endpoints' logic (create_app wires them to routes)."""

    def __init__(self, model, tokenizer: Tokenizer, cfg: ServeConfig, model_id: str):
        self.tokenizer, self.cfg, self.model_id = tokenizer, cfg, model_id
        self.context = model.config.max_seq_len
        self.engine = Engine(model, cfg.max_batch, cfg.max_queue)
        self.created = int(time.time())

    def check_auth(self, request: Request):
        if self.cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.cfg.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "nanollm"}

    async def parse(self, request: Request, cls: type[GenerationRequest]) -> GenerationRequest:
        self.check_auth(request)
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            req = cls.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != self.model_id:
            raise APIError(404, f"The model `{req.model}` does not exist; this server has `{self.model_id}`",
                           param="model", code="model_not_found")
        if req.n > self.cfg.max_n:
            raise APIError(400, f"n must be at most {self.cfg.max_n}, got {req.n}", param="n")
        return req

    def sampling(self, req: GenerationRequest, prompts: list[list[int]], requested: int | None) -> SamplingParams:
        """The engine's settings; checks the prompts and max_tokens against the context."""
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                                f"prompt has {longest} tokens.", param="messages", code="context_length_exceeded")
        if requested is not None and requested > self.cfg.max_tokens:
            raise APIError(400, f"max_tokens is too large: {requested}. This server generates at most "
                                f"{self.cfg.max_tokens} tokens per request.", param="max_tokens")
        if requested is not None and longest + requested > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {longest + requested} tokens ({longest} in the prompt, {requested} for "
                                f"the completion).", param="max_tokens", code="context_length_exceeded")
        stop_ids = () if req.ignore_eos else (self.tokenizer.im_end_id, self.tokenizer.eot_id)
        return SamplingParams(max_tokens=requested or min(self.cfg.max_tokens, self.context - longest),
                              temperature=req.temperature, top_k=req.top_k or None, top_p=req.top_p,
                              repetition_penalty=req.penalty(), seed=req.seed, stop_ids=stop_ids)

    async def generate(self, request: Request, req: GenerationRequest, prompts: list[list[int]],
                       requested: int | None, kind: str):
        """Answer a chat ('chat') or text ('text') completion request, streamed or whole."""
        params = self.sampling(req, prompts, requested)
        gen = Generation(self.engine, self.tokenizer, prompts, params, req.n, req.stops(), self.cfg.request_timeout)
        gen.start()
        head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_id}
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self.stream(gen, head, kind, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons = [""] * len(gen.seqs), [None] * len(gen.seqs)
        watcher = asyncio.create_task(self.cancel_on_disconnect(request, gen))
        try:
            async for i, text, reason in gen.events():
                texts[i] += text
                reasons[i] = reason or reasons[i]
        finally:
            watcher.cancel()
            gen.cancel()
        if "error" in reasons:
            raise APIError(500, "Generation failed on the server; the error is in its log", type="server_error")
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "object": "chat.completion" if kind == "chat" else "text_completion", "choices": choices,
                "usage": gen.usage()}

    @staticmethod
    async def cancel_on_disconnect(request: Request, gen: Generation):
        """A whole (non-streamed) answer is only sent at the end: look for a client that went away meanwhile."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        gen.cancel()

    async def stream(self, gen: Generation, head: dict, kind: str, usage: bool):
        """Server-sent events: one chunk per piece of text, a last one per choice with its finish_reason,
        optionally a usage chunk, then [DONE]. A client that disconnects ends this generator: its sequences
        are cancelled in the finally."""
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices, **extra) -> str:
            return event({**head, "object": obj, "choices": choices, **extra})

        try:
            if kind == "chat":
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(gen.seqs))])
            async for i, text, reason in gen.events():
                if reason == "error":
                    yield event({"error": APIError(500, "Generation failed on the server", "server_error").body})
                    return
                if kind == "chat":
                    delta = {"content": text} if text else {}
                    choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                else:
                    choice = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
                if text:
                    yield chunk([choice])
                if reason:
                    yield chunk([{**choice, **({"delta": {}} if kind == "chat" else {"text": ""}),
                                  "finish_reason": reason}])
            if usage:
                yield chunk([], usage=gen.usage())
            yield "data: [DONE]\n\n"
        except APIError as e:  # the headers are out: the error goes as an event
            yield event({"error": e.body})
        finally:
            gen.cancel()

    async def chat(self, request: Request):
        req = await self.parse(request, ChatRequest)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return await self.generate(request, req, [ids], req.max_completion_tokens or req.max_tokens, "chat")

    async def complete(self, request: Request):
        req = await self.parse(request, CompletionRequest)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        # An empty prompt starts a new document, as after the end-of-text token between training documents.
        prompts = [self.tokenizer.encode(t) or [self.tokenizer.eot_id] for t in texts]
        return await self.generate(request, req, prompts, req.max_tokens, "text")


def create_app(server: Server) -> FastAPI:
    """The routes; the engine's thread runs while the app does."""

    @asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=server.engine.run, name="engine", daemon=True)
        thread.start()
        yield
        server.engine.stop()
        thread.join(timeout=10)

    app = FastAPI(title="nanollm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown paths (404), wrong methods (405)
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return APIError(500, f"Internal server error ({type(e).__name__})", type="server_error").response()

    @app.get("/")
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id, **server.engine.load()}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        server.check_auth(request)
        if model_id != server.model_id:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return server.model_card()

    app.post("/v1/chat/completions")(server.chat)
    app.post("/v1/completions")(server.complete)
    return app


def load_server(cfg: ServeConfig) -> Server:
    """The checkpoint (as demo.py finds and loads it) behind a Server."""
    device = pick_device(cfg.device)
    checkpoint = find_checkpoint(cfg.checkpoint, log=info)
    model, tokenizer, stage = load_checkpoint(checkpoint, device, log=info, quantize=cfg.quantize)
    model = model.to(device, pick_dtype(cfg.dtype, device)).eval()
    if stage in ("pretrain", None):
        info(f"note: stage {stage or 'unknown'}: the model has not been trained on the chat template, so "
             f"/v1/completions (text continuation) suits it better than /v1/chat/completions")
    model_id = cfg.model_name or f"nanollm-{checkpoint.resolve().name}"
    info(f"model {model_id}: {model.describe_size()} on {device}, context {model.config.max_seq_len} tokens, "
         f"{cfg.max_batch} sequences at a time, {torch.get_num_threads()} threads")
    return Server(model, tokenizer, cfg, model_id)


def main(argv: list[str] | None = None):
    cfg = parse_args(ServeConfig, argv, description=__doc__)
    with exit_on_bad_input():
        server = load_server(cfg)
    info(f"web chat: http://{cfg.host}:{cfg.port}/   API: http://{cfg.host}:{cfg.port}/v1")
    uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()
