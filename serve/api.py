"""The OpenAI-compatible HTTP API in front of the engine (FastAPI on uvicorn; `llmc serve`).

Routes: POST /v1/completions and /v1/chat/completions (whole answers, or `stream: true` as
server-sent events ending in `data: [DONE]`), GET /v1/models, GET /health (503 until the model
is loaded), GET /metrics (Prometheus). The layer holds no model state: it checks a request's
fields, turns it into an engine `Request` and the engine's outputs into OpenAI's JSON.

Errors are OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`: a malformed body or
field 400 (naming the field), a prompt and max_tokens over the context 400 (naming both), an
unknown model 404, a full queue 429 with Retry-After, a missing or wrong API key 401, a server
still loading or shutting down 503. A client that disconnects aborts its request: its sequence
leaves the batch and its KV blocks go back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..runtime.errors import LlmcError
from .engine import Engine, Output, QueueFull, Request, RequestError, ShuttingDown
from .metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = \
            status, message, param, code, kind, headers


@dataclass
class State:
    """What the app serves: set once the model is loaded (`engine` None until then)."""

    model_name: str
    api_key: str | None = None
    grace: float = 30.0  # seconds the engine lets running requests finish at shutdown
    engine: Engine | None = None
    model: object | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def stats(self) -> dict:
        return self.engine.stats() if self.engine else {}


def create_app(state: State) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        if state.engine is not None:  # uvicorn has stopped taking requests: finish or abort the rest
            await asyncio.to_thread(state.engine.shutdown, state.grace)

    app = FastAPI(title="llmc", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics(state.stats)
    app.state.llmc, app.state.metrics = state, metrics

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                            status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def authorize(request: HttpRequest, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                return await api_error(request, ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                                         code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "llmc"}]}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await _body(request)
        engine = _engine(state, body)
        prompt = _completion_prompt(state, body)
        params = _request(body, prompt, engine, DEFAULT_COMPLETION_TOKENS, logprobs=_int(body, "logprobs", 0, 20))
        return await _answer(request, engine, params, body, Completion(state, params, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await _body(request)
        engine = _engine(state, body)
        prompt = _chat_prompt(state, body)
        top = _int(body, "top_logprobs", 0, 20)
        logprobs = (top or 0) if _bool(body, "logprobs", False) else None
        if top is not None and logprobs is None:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        default = engine.model.max_seq_len - len(prompt)
        params = _request(body, prompt, engine, default, logprobs=logprobs,
                          max_tokens_field="max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
        return await _answer(request, engine, params, body, Completion(state, params, chat=True))

    return app


# -- requests in --

async def _body(request: HttpRequest) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _engine(state: State, body: dict) -> Engine:
    if state.engine is None:
        raise ApiError(503, "the model is still loading", kind="server_error", code="loading")
    name = body.get("model")
    if name is not None and name != state.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}", "model",
                       "model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, f"n {body.get('n')!r}: only n = 1 is supported", "n")
    return state.engine


def _completion_prompt(state: State, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return _tokenizer(state, "prompt").encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "prompt: a string, or a list of token ids (one prompt per request)", "prompt")


def _chat_prompt(state: State, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: a non-empty list of {role, content} is needed", "messages")
    plain = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: must be an object with a string role and content", f"messages[{i}]")
        plain.append({"role": m["role"], "content": content})
    model = state.engine.model
    try:
        text = model.chat_template().render(plain)
    except LlmcError as e:
        raise ApiError(400, str(e), "messages") from None
    return _tokenizer(state, "messages").encode(text, special_tokens=False)


def _tokenizer(state: State, param: str):
    if not state.engine.model.has_tokenizer:
        raise ApiError(400, "this model bundles no tokenizer: give the prompt as token ids", param)
    return state.engine.model.text


def _request(body: dict, prompt: list[int], engine: Engine, default_tokens: int, logprobs: int | None,
             max_tokens_field: str = "max_tokens") -> Request:
    max_tokens = _int(body, max_tokens_field, 1, None)
    max_tokens = default_tokens if max_tokens is None else max_tokens
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop: a non-empty string or a list of them", "stop")
    top_k = _int(body, "top_k", -1, None)
    request = Request(tuple(prompt), max_tokens, temperature=_number(body, "temperature", 1.0, 0.0),
                      top_k=None if top_k in (None, -1, 0) else top_k, top_p=_number(body, "top_p", None, 0.0, 1.0),
                      seed=_int(body, "seed", 0, 2 ** 64 - 1), stop=tuple(stop),
                      ignore_eos=_bool(body, "ignore_eos", False), logprobs=logprobs)
    if request.top_p is not None and request.top_p <= 0:
        raise ApiError(400, "top_p: must be in (0, 1]", "top_p")
    try:
        engine.check(request)
    except RequestError as e:
        raise ApiError(400, str(e), max_tokens_field if "max_tokens" in str(e) else "prompt") from None
    return request


def _int(body: dict, name: str, low: int | None, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or \
            (high is not None and value > high):
        bounds = f" from {low}" * (low is not None) + f" to {high}" * (high is not None)
        raise ApiError(400, f"{name} {value!r}: must be an integer{bounds}", name)
    return value


def _number(body: dict, name: str, default, low: float, high: float | None = None):
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or \
            (high is not None and value > high) or value != value:
        raise ApiError(400, f"{name} {value!r}: must be a number from {low}" + f" to {high}" * (high is not None),
                       name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} {value!r}: must be true or false", name)
    return value


# -- answers out --

class Completion:
    """OpenAI's JSON for one request's outputs: a completion or a chat completion, whole or in
    chunks."""

    def __init__(self, state: State, request: Request, chat: bool):
        self.state, self.request, self.chat = state, request, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.text = self.state.engine.model.text if self.state.engine.model.has_tokenizer else None

    def _frame(self, choices: list, usage: dict | None = None, chunk: bool = False) -> dict:
        out = {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
               "created": self.created, "model": self.state.model_name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def _token(self, token: int) -> str:
        return self.text.decode([token]) if self.text else str(token)

    def logprobs(self, outputs: list[Output]):
        outputs = [o for o in outputs if o.logprob is not None]
        if self.request.logprobs is None:
            return None
        if self.chat:
            return {"content": [{"token": self._token(o.token), "logprob": o.logprob,
                                 "bytes": list(self._token(o.token).encode()),
                                 "top_logprobs": [{"token": self._token(t), "logprob": lp,
                                                   "bytes": list(self._token(t).encode())}
                                                  for t, lp in o.top_logprobs]} for o in outputs]}
        tokens = [self._token(o.token) for o in outputs]
        offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]  # within this answer's text
        return {"tokens": tokens, "token_logprobs": [o.logprob for o in outputs],
                "top_logprobs": [{self._token(t): lp for t, lp in o.top_logprobs} for o in outputs],
                "text_offset": offsets}

    @staticmethod
    def usage(last: Output) -> dict:
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens}

    def whole(self, outputs: list[Output]) -> dict:
        text, last = "".join(o.text for o in outputs), outputs[-1]
        choice = {"index": 0, "logprobs": self.logprobs(outputs), "finish_reason": last.finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return self._frame([choice], self.usage(last))

    def chunk(self, output: Output, first: bool) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": output.text} if first else \
                {"content": output.text} if output.text or not output.finish_reason else {}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": output.text}
        choice.update({"logprobs": self.logprobs([output]), "finish_reason": output.finish_reason})
        return self._frame([choice], chunk=True)

    def usage_chunk(self, last: Output) -> dict:
        return self._frame([], self.usage(last), chunk=True)


async def _answer(http: HttpRequest, engine: Engine, request: Request, body: dict, shape: Completion):
    try:
        outputs = engine.submit(request)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}", code="rate_limit_exceeded", kind="requests",
                       headers={"Retry-After": "1"}) from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), kind="server_error", code="shutting_down") from None
    except RequestError as e:
        raise ApiError(400, str(e)) from None
    if _bool(body, "stream", False):
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options: must be an object", "stream_options")
        return StreamingResponse(_events(outputs, shape, bool(options.get("include_usage"))),
                                 media_type="text/event-stream")
    collected = await _collect(http, outputs)
    return shape.whole(collected)


async def _events(outputs, shape: Completion, include_usage: bool):
    """Server-sent events; a disconnect cancels this generator, and closing `outputs` aborts the
    request in the engine."""
    try:
        first, last = True, None
        async for output in outputs:
            last = output
            if output.text or output.finish_reason or first or output.logprob is not None:
                yield f"data: {json.dumps(shape.chunk(output, first))}\n\n"
                first = False
        if include_usage and last is not None:
            yield f"data: {json.dumps(shape.usage_chunk(last))}\n\n"
        yield "data: [DONE]\n\n"
    except LlmcError as e:  # the engine failed this request after the answer began
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'code': None}})}\n\n"
    finally:
        await outputs.aclose()


async def _collect(http: HttpRequest, outputs) -> list[Output]:
    """Every output of a whole (not streamed) answer; a client that leaves meanwhile aborts it."""
    async def drain():
        return [o async for o in outputs]
    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await http.is_disconnected():
                raise ApiError(499, "the client closed the connection")
    except LlmcError as e:
        raise ApiError(500, f"the request failed: {e}", kind="server_error") from None
    finally:
        task.cancel()  # a no-op when drained; else the engine aborts the request
