"""The engine: one thread that owns the model and runs continuous batching over every request.

Each loop iteration, between two decoding steps:
1. run the queued commands (load / unload an adapter): nothing else touches the model, so a forward pass never sees
   an adapter half loaded;
2. admit waiting requests, oldest first, while the batch has room and their adapter is (or can be made) resident;
   their prompts run as one prefill pass and the rows join the running batch (serve/batch.py);
3. one decoding step for all running rows: one forward pass, whatever mix of adapters the rows use (peftkit's
   per-row routing; never a loop over adapters); rows that finish leave the batch.

A row's adapter, tokens and cache belong to its request only: routing is per row, the cache per row (masked padding),
and the sampler draws with the request's own generator. Results go back through the request's ``emit`` callback,
called on this thread (the web layer hands them to its event loop).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.core.layer import BASE, fixed_weights
from peftkit.serve.adapters import AdapterRegistry
from peftkit.serve.batch import KVBatch, decode_step, prefill
from peftkit.serve.sampling import SamplingParams, TextStream, make_generator, next_tokens

log = logging.getLogger("peftkit.serve")


@dataclass
class Event:
    """What a request receives after each step: new text, and at the end why it stopped (or an error)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | None while running
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, the per-row adapter name (BASE for the base model) and sampling settings."""

    prompt: list[int]
    adapter: str
    params: SamplingParams
    emit: Callable[[Event], None]
    tokenizer: Any = None
    streaming: bool = True  # False: one event at the end with the whole text (no wake-up of the caller per token)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    stream: TextStream = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.stream = TextStream(self.tokenizer, self.params.stop)
        self.generator = make_generator(self.params.seed)


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class Engine:
    """Continuous batching over one model with many adapters (see the module docstring)."""

    def __init__(
        self,
        registry: AdapterRegistry,
        tokenizer: Any,
        eos_ids: set[int],
        max_batch: int,
        max_length: int,
        vocab_size: int,
    ) -> None:
        self.registry = registry
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.max_length = max_length  # prompt + generated tokens, the model's positions
        self.vocab_size = vocab_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._running: list[Request] = []
        self._joining: list[Request] = []  # admitted, in the prefill pass
        self._kv = KVBatch()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (a test reads it to see that requests shared passes)
        self.max_rows_seen = 0
        self.dropped = 0  # rows dropped because their client went away

    # ---- called from other threads --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="peftkit-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStopped("The server is shutting down; retry on another instance.")
            self._waiting.append(request)
            self._cond.notify()

    def call(self, function: Callable[[], Any]) -> Future:
        """Run ``function`` on the engine thread between two steps; its result (or error) arrives in the future."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise EngineStopped("The server is shutting down; retry on another instance.")
            self._commands.append((function, future))
            self._cond.notify()
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the running and waiting ones, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._commands or self._waiting or self._running or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._commands or self._waiting or self._running):
                    return
                commands = list(self._commands)
                self._commands.clear()
            for function, future in commands:
                self._run_command(function, future)
            try:
                self._admit()
                self._step()
            except Exception as err:  # a model error ends the requests in flight, never the server
                log.exception("generation failed")
                self._fail_all(f"generation failed: {type(err).__name__}: {err}")

    @staticmethod
    def _run_command(function: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(function())
        except Exception as err:
            future.set_exception(err)

    def _take_joiners(self) -> list[Request]:
        """Waiting requests that fit in the batch now, oldest first. Only this thread removes from ``_waiting``
        (others append), so no lock is held while an adapter loads from disk."""
        joiners: list[Request] = []
        while self._waiting and len(self._running) + len(joiners) < self.max_batch:
            request = self._waiting[0]
            problem = None if request.cancelled else self._make_resident(request)
            if problem == "full":
                break  # every resident adapter is busy: wait for rows to finish
            self._waiting.popleft()
            if problem is None and not request.cancelled:
                self.registry.acquire(request.adapter)
                joiners.append(request)
            elif problem is not None:
                request.emit(Event(error=problem, finish_reason="error"))
        return joiners

    def _make_resident(self, request: Request) -> str | None:
        """None when the request's adapter is in memory; "full" when it must wait; else why it cannot run."""
        if request.adapter != BASE and request.adapter not in self.registry.known:
            return f"adapter {request.adapter!r} was unloaded"
        try:
            return None if self.registry.ensure_resident(request.adapter) else "full"
        except Exception as err:  # its folder changed on disk since it was registered
            return f"adapter {request.adapter!r} failed to load: {err}"

    def _admit(self) -> None:
        joiners = self._joining = self._take_joiners()  # may load adapters: the rank is read after
        rank = self._adapter_rank()
        joiners = self._joining = sorted(joiners, key=rank)  # the prefill reads its rows in place too
        if not joiners:
            return
        model, names = self._plan(joiners)
        with torch.inference_mode(), fixed_weights():  # adapters change only between steps (new parameters)
            logits, kv = prefill(model, [r.prompt for r in joiners], names, self.pad_id)
        tokens = next_tokens(logits, [r.params for r in joiners], [r.generator for r in joiners])
        self._joining = []
        alive = [i for i, (r, t) in enumerate(zip(joiners, tokens)) if not self._advance(r, t)]
        self._running += [joiners[i] for i in alive]
        self._kv = self._kv.stack(kv.keep(alive))
        self._sort_rows(rank)
        self.max_rows_seen = max(self.max_rows_seen, len(self._running))

    def _sort_rows(self, rank: Callable[[Request], int]) -> None:
        """Order the running rows by adapter, in the order the adapters were loaded (the order of each layer's
        factor stack): with as many rows per adapter, every per-row layer then reads the rows where they are
        instead of moving them in and out (methods/lora/rows.py). Rows leave without changing the order, so this
        copies the cache at admissions only, and only when the new rows are out of order."""
        order = sorted(range(len(self._running)), key=lambda i: rank(self._running[i]))
        if order != list(range(len(order))):
            self._running = [self._running[i] for i in order]
            self._kv = self._kv.keep(order)

    def _adapter_rank(self) -> Callable[[Request], int]:
        """A request's adapter's place in load order (the base model first), the key rows are sorted by."""
        model, routed = self.registry.runner()
        rank = {name: k for k, name in enumerate(model.peft_config)} if routed else {}
        return lambda request: rank.get(request.adapter, -1)

    def _step(self) -> None:
        gone = [i for i, r in enumerate(self._running) if r.cancelled]
        self.dropped += len(gone)
        self._drop(gone)
        if not self._running:
            return
        model, names = self._plan(self._running)
        with torch.inference_mode(), fixed_weights():
            logits, self._kv = decode_step(model, self._kv, [r.generated[-1] for r in self._running], names)
        self.steps += 1
        tokens = next_tokens(logits, [r.params for r in self._running], [r.generator for r in self._running])
        done = [i for i, (r, t) in enumerate(zip(self._running, tokens)) if self._advance(r, t)]
        self._drop(done, finished=True)

    def _plan(self, rows: list[Request]) -> tuple[Any, list[str] | None]:
        """The module to call and its per-row adapter names. Rows that all use one adapter run it as the active
        adapter, unrouted (the same values, without gathering per-row factors); a mix is routed row by row."""
        model, routed = self.registry.runner()
        if not routed:
            return model, None
        names = [r.adapter for r in rows]
        if len(set(names)) == 1 and names[0] != BASE:
            self.registry.activate(names[0])
            return model, None
        return model, names

    def _advance(self, request: Request, token: int) -> bool:
        """Give ``request`` its next token; True when it is finished (and told so)."""
        if token in self.eos_ids:
            return self._finish(request, "stop", request.stream.flush())
        request.generated.append(token)
        text = request.stream.push(request.generated)
        if request.stream.stopped:
            return self._finish(request, "stop", text)
        total = len(request.prompt) + len(request.generated)
        if len(request.generated) >= request.params.max_tokens or total >= self.max_length:
            return self._finish(request, "length", text + request.stream.flush())
        if request.streaming:
            request.emit(Event(text=text, completion_tokens=len(request.generated)))
        return False

    def _finish(self, request: Request, reason: str, text: str) -> bool:
        self.registry.release(request.adapter)
        whole = text if request.streaming else request.stream.sent  # everything sent so far, ``text`` included
        request.emit(Event(text=whole, finish_reason=reason, completion_tokens=len(request.generated)))
        return True

    def _drop(self, rows: list[int], finished: bool = False) -> None:
        if not rows:
            return
        gone = set(rows)
        if not finished:
            for i in rows:
                self.registry.release(self._running[i].adapter)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._running = [self._running[i] for i in keep]
        self._kv = self._kv.keep(keep)

    def _fail_all(self, message: str) -> None:
        for request in self._running + self._joining:
            self.registry.release(request.adapter)
            request.emit(Event(error=message, finish_reason="error"))
        self._running, self._joining, self._kv = [], [], KVBatch()
