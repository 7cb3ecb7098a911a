"""What a client of the serving engine hands in and gets back: EngineRequest, the events of a
request (Delta, Finished), the RequestHandle they arrive through, and the engine's refusals.

The scheduler thread produces a request's events; a handle lets any thread read them: blocking
(result, for tests and offline use) or as an async iterator on an asyncio loop (events, for the
HTTP server), the events crossing threads through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class EngineRequest:
    """One generation. prompt: text with lmmrt's media markers (any chat template already applied)
    or token ids; images: one media item (PIL image, uint8 array, video clip) per marker, in order.
    temperature 0 is greedy; seed makes sampling reproducible whatever else runs beside it."""

    prompt: str | list[int]
    images: list = field(default_factory=list)
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Delta:
    """New output of a request: text that is final (stop strings cannot take it back, it may be
    empty) and the token ids of this step."""

    text: str
    token_ids: list[int]


@dataclass
class Finished:
    """The last event of a request. finish_reason: "stop" (eos, a stop token or stop string),
    "length" (max_tokens), "cancelled" (cancel() or shutdown), "error" (error says what)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class QueueFull(RuntimeError):
    """The engine's bounded queue is full: try again after `retry_after` seconds (HTTP 503)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosed(RuntimeError):
    """The engine is shutting down (or was shut down) and admits no new request (HTTP 503)."""


class RequestHandle:
    """A submitted request as its client sees it: id, prompt_tokens, its events and cancel()."""

    def __init__(self, request_id: str, prompt_tokens: int, on_cancel):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._events: list[Delta | Finished] = []
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._done = threading.Event()
        self.cancel_requested = False
        self.text = ""
        self.token_ids: list[int] = []
        self.finished: Finished | None = None

    def cancel(self) -> None:
        """Stop the request; its KV slot is freed at the scheduler's next step. No effect once finished."""
        if not self._done.is_set():
            self.cancel_requested = True
            self._on_cancel()

    async def events(self) -> AsyncIterator[Delta | Finished]:
        """Every event of the request from the first, ending with its Finished; for an asyncio loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        # the events so far and the listener for later ones under one lock: none lost, none twice
        with self._lock:
            backlog = list(self._events)
            listener = (loop, queue)
            self._listeners.append(listener)
        try:
            for ev in backlog:
                yield ev
                if isinstance(ev, Finished):
                    return
            while True:
                ev = await queue.get()
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            with self._lock:
                self._listeners.remove(listener)

    def result(self, timeout: float | None = None) -> tuple[str, list[int], str, dict]:
        """Wait for the end: (text, token_ids, finish_reason, usage). TimeoutError after `timeout` s."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        fin = self.finished
        usage = {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
                 "total_tokens": fin.prompt_tokens + fin.completion_tokens}
        return self.text, list(self.token_ids), fin.finish_reason, usage

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def emit(self, ev: Delta | Finished) -> None:
        """The engine's side: record an event and wake the listeners (any thread)."""
        with self._lock:
            if self.finished is not None:
                return
            if isinstance(ev, Delta):
                self.text += ev.text
                self.token_ids += ev.token_ids
            else:
                self.finished = ev
            self._events.append(ev)
            listeners = list(self._listeners)
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # that loop is closed: its reader is gone
                pass
        if isinstance(ev, Finished):
            self._done.set()
