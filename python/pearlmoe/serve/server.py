"""The OpenAI-compatible HTTP layer over the engine: /v1/models, /v1/completions,
/v1/chat/completions (streaming as server-sent events, or one JSON body), /health and a
Prometheus-style /metrics. Starlette + uvicorn: an ASGI app with no request-model layer
between the JSON and the engine (the checks below are OpenAI's parameter rules, written out).

The engine runs on its own thread; a request's tokens come back through an asyncio queue
(``call_soon_threadsafe``), and its text is built here: whole UTF-8 characters only, and held
back while it could still be the start of a stop string.
"""

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Request


class BadRequest(Exception):
    """An OpenAI-style 400: message, the offending parameter, a code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def error_response(message: str, status: int = 400, param=None, code=None, kind=None) -> Response:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass
class ServedModel:
    """What the server needs besides the engine: the name clients use, the tokenizer, the chat
    template (Jinja, or None for the plain "role: content" fallback) and the EOS ids."""

    name: str
    tokenizer: object
    chat_template: str | None
    eos: frozenset[int]
    created: int = 0


class TextAssembler:
    """Token ids in, text out: complete characters only, stop strings cut (and never streamed
    in part). Decodes incrementally: each call decodes the newest tokens together with the
    previous call's (a tokenizer may render a token differently at the start of a string) and
    keeps what they add, so a long completion costs O(tokens), not O(tokens²)."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the text of ids[:read]
        self.prefix = self.read = 0  # ids[prefix:read]: the context decoded with the new ones
        self.sent = 0  # characters already returned
        self.stopped = False

    def _decode(self, final: bool) -> None:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]  # a character cut between tokens waits
            self.prefix, self.read = self.read, len(self.ids)

    def add(self, tokens: list[int], final: bool = False) -> str:
        """The new text that is safe to send after these tokens (everything left when final)."""
        self.ids.extend(tokens)
        if self.stopped:
            return ""
        searched = len(self.text)
        self._decode(final)
        text = self.text
        for stop in self.stop:
            at = text.find(stop, max(0, min(searched, self.sent) - len(stop) + 1))
            if at >= 0:
                self.stopped = True
                text = text[:at]
        if not (final or self.stopped):
            hold = 0  # the longest tail that may still grow into a stop string
            for stop in self.stop:
                for n in range(min(len(stop) - 1, len(text)), hold, -1):
                    if stop.startswith(text[len(text) - n :]):
                        hold = n
                        break
            text = text[: len(text) - hold]
        out = text[self.sent :] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return out


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'}", name)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be in [{low}, {high}], got {value}", name)
    return value


def _stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of at most 4 strings", "stop")
    return stop


class Server:
    """The routes over one engine and one served model."""

    def __init__(self, engine: Engine, model: ServedModel) -> None:
        self.engine, self.model = engine, model
        self.http_requests = 0
        self.http_errors = 0
        self.app = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/metrics", self.metrics),
                Route("/v1/models", self.models),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app) -> AsyncIterator[None]:
        self.engine.start()  # the engine's thread lives as long as the server
        try:
            yield
        finally:
            self.engine.stop()

    # ---- simple routes -----------------------------------------------------------------------

    async def health(self, _: HttpRequest) -> Response:
        if self.engine.error is not None:
            return error_response(f"engine stopped: {self.engine.error}", 500)
        return JSONResponse({"status": "ok"})

    async def models(self, _: HttpRequest) -> Response:
        card = {"id": self.model.name, "object": "model", "created": self.model.created,
                "owned_by": "pearlmoe"}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(self, _: HttpRequest) -> Response:
        m, e = self.engine.metrics, self.engine
        lines = []

        def metric(name: str, kind: str, help_: str, value, labels: str = "") -> None:
            if not any(line.startswith(f"# TYPE pearlmoe_{name} ") for line in lines):
                lines.append(f"# HELP pearlmoe_{name} {help_}")
                lines.append(f"# TYPE pearlmoe_{name} {kind}")
            lines.append(f"pearlmoe_{name}{labels} {value}")

        metric("requests_total", "counter", "Requests accepted by the engine.", m.requests)
        for reason, count in sorted(m.finished.items()):
            metric("requests_finished_total", "counter", "Requests ended, by reason.", count,
                   f'{{reason="{reason}"}}')  # fmt: skip
        metric("requests_running", "gauge", "Requests holding a batch slot.", m.running)
        metric("requests_waiting", "gauge", "Requests queued for a slot.", m.waiting)
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", m.prompt_tokens)
        metric("generation_tokens_total", "counter", "Tokens generated.", m.generated_tokens)
        metric("rounds_total", "counter", "Decode rounds.", m.rounds)
        metric("target_calls_total", "counter", "Target model steps.", m.target_calls)
        metric("plain_rounds_total", "counter", "Rounds the speculation gate ran as plain steps "
               "of the target alone.", m.plain_rounds)  # fmt: skip
        metric("draft_calls_total", "counter", "Draft model steps.", m.draft_calls)
        metric("draft_tokens_proposed_total", "counter", "Draft tokens verified.", m.proposed)
        metric("draft_tokens_accepted_total", "counter", "Draft tokens accepted.", m.accepted)
        rate = m.accepted / m.proposed if m.proposed else 0.0
        metric("acceptance_rate", "gauge", "Accepted over proposed draft tokens.", f"{rate:.6f}")
        per_call = m.generated_tokens / m.target_calls if m.target_calls else 0.0
        metric("tokens_per_target_call", "gauge", "Generated tokens per target step (all "
               "sequences of a step).", f"{per_call:.6f}")  # fmt: skip
        batch = m.batch_sum / m.rounds if m.rounds else 0.0
        metric("batch_size_mean", "gauge", "Sequences per round, on average.", f"{batch:.6f}")
        metric("batch_size_sum_total", "counter", "Sequences stepped, summed over rounds.",
               m.batch_sum)  # fmt: skip
        metric("queue_seconds_total", "counter", "Seconds requests waited for a slot.",
               f"{m.queue_seconds:.6f}")  # fmt: skip
        metric("time_to_first_token_seconds_total", "counter", "Seconds from arrival to the "
               "first token, summed over requests.", f"{m.ttft_seconds:.6f}")  # fmt: skip
        metric("http_requests_total", "counter", "HTTP requests to the API.", self.http_requests)
        metric("http_errors_total", "counter", "API requests answered 4xx/5xx.", self.http_errors)
        labels = f'{{model="{self.model.name}",mode="{e.mode}",max_batch="{e.max_batch}"}}'
        metric("info", "gauge", "The served model and mode.", 1, labels)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ---- completions -------------------------------------------------------------------------

    async def completions(self, http: HttpRequest) -> Response:
        return await self._serve(http, chat=False)

    async def chat_completions(self, http: HttpRequest) -> Response:
        return await self._serve(http, chat=True)

    async def _serve(self, http: HttpRequest, chat: bool) -> Response:
        self.http_requests += 1
        try:
            try:
                body = json.loads(await http.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise BadRequest(f"the request body is not valid JSON ({err})") from None
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            req, stop, options = self._request(body, chat)
            self.engine.submit(req)
        except BadRequest as err:
            self.http_errors += 1
            return error_response(str(err), 400, err.param, err.code)
        except ValueError as err:  # the engine's own checks (context length, token ids)
            self.http_errors += 1
            return error_response(str(err), 400, None, "invalid_request")
        except RuntimeError as err:  # the engine has stopped
            self.http_errors += 1
            return error_response(str(err), 500)
        events = self._events(req)
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if options["stream"]:
            chunks = self._stream(req, events, stop, chat, ident, options["include_usage"])
            return StreamingResponse(chunks, media_type="text/event-stream")
        text, reason = await self._collect(http, req, events, stop)
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({
            "id": ident, "object": kind, "created": int(time.time()), "model": self.model.name,
            "choices": [choice], "usage": _usage(req),
        })  # fmt: skip

    def _request(self, body: dict, chat: bool) -> tuple[Request, list[str], dict]:
        model = body.get("model")
        if model != self.model.name:
            raise BadRequest(f"the model `{model}` does not exist; this server serves "
                             f"`{self.model.name}`", "model", "model_not_found")  # fmt: skip
        if _number(body, "n", 1, 1, 1, integer=True) != 1:
            raise BadRequest("only n = 1 is supported", "n")
        prompt = self._chat_prompt(body) if chat else self._completion_prompt(body)
        limit = self.engine.context - len(prompt)
        name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        default = max(limit, 1) if chat else 16
        max_tokens = _number(body, name, default, 1, 2**31, integer=True)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p <= 0:
            raise BadRequest("top_p must be greater than 0", "top_p")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest("seed must be an integer", "seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be a boolean", "stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise BadRequest("stream_options must be an object", "stream_options")
        req = Request(
            prompt=prompt, max_tokens=max_tokens, temperature=float(temperature),
            top_p=None if top_p >= 1 else float(top_p), seed=seed, eos=self.model.eos,
        )  # fmt: skip
        options = {"stream": stream, "include_usage": bool(stream_options.get("include_usage"))}
        return req, _stop_list(body), options

    def _encode(self, text: str) -> list[int]:
        return self.model.tokenizer.encode(text).ids

    def _completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self._encode(prompt)
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
        else:
            raise BadRequest("prompt must be a string or a list of token ids (one prompt)",
                             "prompt")  # fmt: skip
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        return ids

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", "messages")
        turns = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest("each message needs a role and a content string", "messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise BadRequest("only text content is supported", "messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise BadRequest("each message needs a role and a content string", "messages")
            turns.append({"role": m["role"], "content": content})
        return self._encode(render_chat(self.model.chat_template, turns))

    # ---- results -----------------------------------------------------------------------------

    def _events(self, req: Request) -> asyncio.Queue:
        """A queue of (tokens, finish_reason) the engine thread fills for this request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_tokens(tokens: list[int], reason: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (tokens, reason))

        req.on_tokens = on_tokens
        return queue

    async def _next(self, req: Request, events: asyncio.Queue, text: TextAssembler):
        """(new text, finish reason or None); a stop string ends the request early. Rounds the
        engine finished while this request's last chunk was being sent go out as one chunk."""
        tokens, reason = await events.get()
        while reason is None and not events.empty():
            more, reason = events.get_nowait()
            tokens = tokens + more
        if reason is not None:  # the engine let the request go
            piece = text.add(tokens, final=True)
            return piece, ("stop" if reason == "cancelled" or text.stopped else reason)
        piece = text.add(tokens)
        if text.stopped:
            self.engine.cancel(req, "stop")
            return piece, "stop"
        return piece, None

    async def _collect(
        self, http: HttpRequest, req: Request, events: asyncio.Queue, stop: list[str]
    ) -> tuple[str, str]:
        text, parts = TextAssembler(self.model.tokenizer, stop), []
        while True:
            try:
                piece, reason = await asyncio.wait_for(self._next(req, events, text), 0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():  # nobody is waiting: free the slot
                    self.engine.cancel(req)
                    return "".join(parts), "cancelled"
                continue
            parts.append(piece)
            if reason is not None:
                return "".join(parts), reason

    async def _stream(
        self, req: Request, events: asyncio.Queue, stop: list[str], chat: bool, ident: str,
        include_usage: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        created, name = int(time.time()), self.model.name
        kind = "chat.completion.chunk" if chat else "text_completion"
        text = TextAssembler(self.model.tokenizer, stop)

        def chunk(piece: str | None, reason: str | None, usage: dict | None = None) -> str:
            if chat:
                delta = {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": reason,
                          "logprobs": None}  # fmt: skip
            body = {"id": ident, "object": kind, "created": created, "model": name,
                    "choices": [] if usage else [choice]}  # fmt: skip
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None, "logprobs": None}  # fmt: skip
                head = {"id": ident, "object": kind, "created": created, "model": name,
                        "choices": [first]}  # fmt: skip
                yield f"data: {json.dumps(head)}\n\n"
            while True:
                piece, reason = await self._next(req, events, text)
                if piece:
                    yield chunk(piece, None)
                if reason is not None:
                    yield chunk(None, reason)
                    if include_usage:
                        yield chunk(None, None, _usage(req))
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client went away (or the stream ended): the slot is freed either way
            if req.finish_reason is None:
                self.engine.cancel(req)


def _usage(req: Request) -> dict:
    prompt, completion = len(req.prompt), len(req.output)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def parse_metrics(text: str) -> dict[str, float]:
    """/metrics' text back into {name{labels}: value} (for tests and benchmarks)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def render_chat(template: str | None, messages: list[dict]) -> str:
    """The conversation as the model's chat template renders it, ready for the reply; without
    a template, "role: content" lines and "assistant:"."""
    if template is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    from ..model.gguf_checkpoint import render_chat_template

    return render_chat_template(template, messages)


def serve(
    engine: Engine, model: ServedModel, host: str = "127.0.0.1", port: int = 8000,
    ready: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """Run the server until interrupted."""
    import uvicorn

    server = Server(engine, model)
    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning")
    if ready is not None:
        ready(f"http://{host}:{port}")
    uvicorn.Server(config).run()
