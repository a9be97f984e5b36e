"""An OpenAI-compatible HTTP server with continuous batching and streaming.

    POST /v1/completions        {"prompt": "...", "max_tokens": 16, "stream": false, ...}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /v1/models, GET /health

One `Scheduler` thread owns the engine (whose jitted steps are not re-entrant). Each loop turn it
either prefills waiting requests into free decode slots (new requests join between decode
dispatches: continuous batching) or runs one dispatch of decode steps (the engine's
steps_per_dispatch) for every slot, then hands each sampled token to its request. Handlers only
talk to the scheduler through thread-safe queues, so a slow client never stalls decoding; a
client that disconnects frees its slot at the next dispatch.

Bad requests get a 400 with a reason (OpenAI's error shape); a full queue gets a 429. Nothing that
was accepted is dropped: every accepted request ends with its text and a finish reason ("stop",
"length", or "error" with a message if the engine itself failed).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from meshlm.engine import Detokenizer, Engine
from meshlm.errors import MeshlmError
from meshlm.sampling import SamplingParams


# ---- the scheduler (continuous batching) ---------------------------------------------------------
@dataclass
class Job:
    """One accepted request as the scheduler sees it."""

    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    detok: Detokenizer
    events: queue.Queue = field(default_factory=queue.Queue)  # ("delta", str) ... ("done", reason)
    n_generated: int = 0
    cancelled: bool = False


class QueueFull(MeshlmError):
    pass


class Scheduler:
    """Owns the engine; admits requests into free slots between decode steps."""

    def __init__(self, engine: Engine, tokenizer, max_waiting: int = 256):
        self.engine, self.tokenizer = engine, tokenizer
        self.eos = set(engine.eos_ids)
        self.max_waiting = max_waiting
        self.waiting: deque[Job] = deque()
        self.active: dict[int, Job] = {}  # slot -> request
        self.cv = threading.Condition()
        self._stop = False
        self._ids = itertools.count()
        self.thread = threading.Thread(target=self._loop, name="meshlm-scheduler", daemon=True)
        self.thread.start()

    # -- called from request handlers --
    def submit(self, prompt_ids: list[int], sampling: SamplingParams) -> Job:
        if not prompt_ids:
            raise MeshlmError("the prompt is empty")
        if len(prompt_ids) >= self.engine.max_len:
            raise MeshlmError(f"the prompt has {len(prompt_ids)} tokens; this server's context is "
                              f"{self.engine.max_len} tokens")
        req = Job(f"cmpl-{next(self._ids)}", list(prompt_ids), sampling,
                       Detokenizer(self.tokenizer.decode, sampling.stop))
        with self.cv:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; try again shortly")
            self.waiting.append(req)
            self.cv.notify()
        return req

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
        self.thread.join(timeout=10)

    # -- the loop --
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not (self._stop or self.waiting or self.active):
                    self.cv.wait()
                if self._stop:
                    return
                free = [s for s in range(self.engine.slots) if s not in self.active]
                admit = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
            try:
                if admit:
                    self._admit(admit, free)
                else:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests, not the server
                for req in admit + list(self.active.values()):
                    req.events.put(("done", "error", f"engine error: {e}"))
                self.active.clear()

    def _admit(self, reqs: list[Job], free: list[int]) -> None:
        live = [r for r in reqs if not r.cancelled]
        if not live:
            return
        pre = self.engine.prefill([r.prompt_ids for r in live], [r.sampling for r in live])
        for i, req in enumerate(live):
            if self._deliver(req, pre.first_ids[i], pre.lengths[i]):
                self.engine.insert(pre, i, free[i], req.sampling)
                self.active[free[i]] = req

    def _step(self) -> None:
        eng = self.engine
        with self.cv:
            ahead = not self.waiting  # with requests waiting, an insert may follow
        ids = eng.generate(ahead=ahead)  # [k, slots]: k steps per dispatch
        for j, row in enumerate(ids):
            for slot, req in list(self.active.items()):  # a request ended at row j ignores the rest
                if not self._deliver(req, int(row[slot]), int(eng.row_positions(j)[slot])):
                    del self.active[slot]

    def _deliver(self, req: Job, tok: int, position: int) -> bool:
        """Hand one sampled token to its request; False when the request has ended."""
        if req.cancelled:
            return False
        sp = req.sampling
        reason = None
        if tok in self.eos and not sp.ignore_eos:
            reason = "stop"
        else:
            req.n_generated += 1
            if not req.detok.add(tok):
                reason = "stop"  # a stop string appeared
            elif req.n_generated >= sp.max_tokens or position + 1 >= self.engine.max_len:
                reason = "length"
        delta = req.detok.delta(final=reason is not None)
        if delta:
            req.events.put(("delta", delta))
        if reason is not None:
            req.events.put(("done", reason, None))
            return False
        return True


# ---- the OpenAI-shaped API -----------------------------------------------------------------------
class _Common(BaseModel):
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension (vLLM has it too): 0 is off
    seed: int | None = Field(None, ge=0, lt=2**31)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False

    def sampling(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              seed=self.seed or 0, max_tokens=self.max_tokens, stop=stop)


class CompletionRequest(_Common):
    prompt: str | list[int]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


def create_app(scheduler: Scheduler, model_name: str, chat_template: bool = True) -> FastAPI:
    app = FastAPI(title="meshlm", description="OpenAI-compatible completions on a device mesh")
    tok = scheduler.tokenizer

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body")

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": len(scheduler.active), "waiting": len(scheduler.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "meshlm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ids = body.prompt if isinstance(body.prompt, list) else tok.encode(body.prompt)
        if isinstance(body.prompt, list) and any(not 0 <= t < tok.vocab_size for t in ids):
            return _error(400, f"prompt token ids must be in [0, {tok.vocab_size})")
        return await _serve(body, ids, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            text = tok.apply_chat_template([m.model_dump() for m in body.messages])
        except MeshlmError as e:
            return _error(400, str(e))
        return await _serve(body, tok.encode(text, add_special=False), request, chat=True)

    async def _serve(body: _Common, ids: list[int], request: Request, chat: bool):
        try:
            req = scheduler.submit(ids, body.sampling())
        except QueueFull as e:
            return _error(429, str(e), "rate_limit_error")
        except MeshlmError as e:
            return _error(400, str(e))
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            return StreamingResponse(_sse(req, request, created, chat), media_type="text/event-stream")
        parts, reason, err = [], None, None
        async for ev in _events(req):
            if ev[0] == "delta":
                parts.append(ev[1])
            else:
                reason, err = ev[1], ev[2]
        if reason == "error":
            return _error(500, err or "engine error", "server_error")
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": req.rid, "object": kind, "created": created, "model": model_name, "choices": [choice],
                "usage": _usage(req)}

    async def _sse(req: Job, request: Request, created: int, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                yield _chunk(req, kind, created, {"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            async for ev in _events(req):
                if await request.is_disconnected():
                    req.cancelled = True
                    return
                if ev[0] == "delta":
                    body = {"delta": {"content": ev[1]}} if chat else {"text": ev[1], "logprobs": None}
                    yield _chunk(req, kind, created, body | {"finish_reason": None})
                else:
                    body = {"delta": {}} if chat else {"text": "", "logprobs": None}
                    if ev[1] == "error":
                        yield "data: " + json.dumps({"error": {"message": ev[2], "type": "server_error"}}) + "\n\n"
                    else:
                        yield _chunk(req, kind, created, body | {"finish_reason": ev[1]}, usage=_usage(req))
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled = True  # a no-op when finished; frees the slot when the client went away

    def _chunk(req, kind, created, choice, usage=None) -> str:
        out: dict[str, Any] = {"id": req.rid, "object": kind, "created": created, "model": model_name,
                               "choices": [{"index": 0} | choice]}
        if usage:
            out["usage"] = usage
        return "data: " + json.dumps(out) + "\n\n"

    return app


async def _events(req: Job):
    """The request's events as they come, without blocking the event loop."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            ev = req.events.get_nowait()
        except queue.Empty:
            ev = await loop.run_in_executor(None, req.events.get)
        yield ev
        if ev[0] == "done":
            return


def _usage(req: Job) -> dict[str, int]:
    n_prompt, n_gen = len(req.prompt_ids), req.n_generated
    return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
