"""AsyncEngine: the LLMEngine step loop in one background thread, for an asyncio server.

Torch work must not run on the event loop (it would stall every other connection), and LLMEngine is
not thread-safe. So exactly one thread, the loop thread, owns the engine: it calls add_request,
abort_request and step, and nothing else touches the engine's request state. The event loop talks to
it through an inbox (a deque under a Condition) and hears back through one asyncio.Queue per request,
filled with `loop.call_soon_threadsafe`:

    event loop                         loop thread
    add_request  --("add", ...)-->     engine.add_request  --accepted / error-->  RequestStream
    RequestStream.close --("abort")--> engine.abort_request
                                       engine.step()  --RequestOutput deltas-->   RequestStream

With nothing to do the loop thread sleeps on the Condition, so an idle server uses no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fp4serve.engine.engine import LLMEngine
from fp4serve.errors import Fp4ServeError
from fp4serve.kernels.cpu_build import release_openmp_threads
from fp4serve.outputs import RequestOutput
from fp4serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(Fp4ServeError):
    """The engine loop is not running (shut down, or stopped by a bug); no request can be served."""


class RequestFailedError(Fp4ServeError):
    """The engine failed while running this request; the request is gone, the server lives on."""


_ACCEPTED = object()  # first item of every stream whose request the engine took


class RequestStream:
    """The outputs of one request, as the loop thread produces them. Iterate it; close it when done
    (closing an unfinished stream aborts its request, so a client that goes away frees its KV blocks)."""

    def __init__(self, request_id: str, owner: AsyncEngine):
        self.request_id = request_id
        self.finished = False
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    async def final_output(self) -> RequestOutput:
        """Wait for the request to finish and return its last output, which holds the whole text."""
        try:
            async for output in self:
                last = output
        finally:
            self.close()
        return last

    def close(self) -> None:
        """Abort the request unless it already finished. Safe to call more than once."""
        if not self.finished:
            self.finished = True
            self._owner._submit(_Abort(self.request_id))

    # Called from the loop thread.
    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._owner._submit(_Abort(self.request_id))


@dataclass
class _Add:
    prompt: str | dict | list[int]
    params: SamplingParams
    stream: RequestStream


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs `engine` in a background thread from construction until `shutdown()`, or, with
    `in_this_thread=True`, in the thread that calls `run()` (`fp4serve serve` runs it on the main
    thread, which loaded the model, and the HTTP server in a thread: on CPU the compute then stays
    with the thread whose OpenMP team did the loading; a second team beside an idle first one
    makes libgomp sleep at every barrier, measured 2x slower decode)."""

    def __init__(self, engine: LLMEngine, in_this_thread: bool = False):
        self.engine = engine
        self._inbox: deque[_Add | _Abort] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._owns_thread = not in_this_thread
        if in_this_thread:
            self._thread = threading.current_thread()
        else:
            if engine.device.type == "cpu":
                release_openmp_threads()  # this thread's idle team (cpu_decode.c release_openmp_threads)
            self._thread = threading.Thread(target=self._run, name="fp4serve-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """The loop, on the calling thread, until `shutdown()` (in_this_thread engines only)."""
        if self._thread is not threading.current_thread():
            raise RuntimeError("AsyncEngine.run() belongs to the thread that made an in_this_thread engine")
        self._run()

    # ---- what the engine offers the server (fixed at load time, safe to read from any thread) --
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def default_sampling(self) -> dict:
        return self.engine.default_sampling

    @property
    def images(self):
        """The engine's ImageSupport: its preprocessor keeps no state, so worker threads may use it."""
        return self.engine.images

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def num_waiting(self) -> int:
        """Requests not yet running: queued for the loop thread or waiting in the scheduler. Read
        without a lock from the event loop, so it may be off by one step: good enough for a limit."""
        return len(self.engine.scheduler.waiting) + sum(isinstance(c, _Add) for c in list(self._inbox))

    def num_queued(self, arriving: int = 0) -> int:
        """Waiting requests beyond the free sequence slots, `arriving` more included: those the
        scheduler could not start on its next step. A burst at an idle server is all admitted at
        once, so none of it counts."""
        scheduler = self.engine.scheduler
        free_slots = max(0, scheduler.max_num_seqs - len(scheduler.running))
        return max(0, self.num_waiting() + arriving - free_slots)

    # ---- the event-loop side ------------------------------------------------------------------
    async def add_request(
        self, prompt: str | dict | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it (raises what engine.add_request
        raises, e.g. InvalidRequestError), so a server can still answer 400 before it streams."""
        return (await self.add_requests([(prompt, params, request_id)]))[0]

    async def add_requests(
        self, requests: list[tuple[str | dict | list[int], SamplingParams, str]]
    ) -> list[RequestStream]:
        """add_request for several (prompt, params, request_id) at once: all are queued before the
        first is awaited, so the loop thread takes them in one pass. All or none: should one be
        refused (or the wait be cancelled), the others are aborted and the first error raised."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        streams = [RequestStream(request_id, self) for _, _, request_id in requests]
        with self._wakeup:  # one notify for the batch; _submit takes the lock again, which is reentrant
            for (prompt, params, _), stream in zip(requests, streams):
                self._submit(_Add(prompt, params, stream))
        try:
            for stream in streams:
                item = await stream._queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
        except BaseException:  # refused, or cancelled while waiting: the others may be added after all
            for stream in streams:
                stream.close()
            raise
        return streams

    async def generate(
        self, prompt: str | dict | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs, one per engine step that advanced it; the last has finished=True.
        Cancellation aborts the request at once; so does closing the generator (aclose(), or its
        garbage collection after a `break`)."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    async def abort(self, request_id: str) -> None:
        """Abort a request by id; its stream ends with a finish_reason 'abort' output."""
        self._submit(_Abort(request_id))

    def shutdown(self) -> None:
        """Stop the loop after its current step; open streams end with EngineDeadError. Waits for
        a background loop thread to end (never for the thread of an in_this_thread engine)."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._owns_thread and threading.current_thread() is not self._thread:
            self._thread.join()

    def _submit(self, command: _Add | _Abort) -> None:
        with self._wakeup:
            if self._stopping:
                if isinstance(command, _Add):  # nobody will ever take it
                    command.stream._put(EngineDeadError("the engine is not running"))
                return
            self._inbox.append(command)
            self._wakeup.notify()

    # ---- the loop thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._next_commands():
                if self.engine.has_unfinished_requests():
                    self._step()
        except Exception:
            log.exception("the engine loop crashed; no more requests can be served")
        finally:
            with self._wakeup:
                self._stopping = True
                pending = [c.stream for c in self._inbox if isinstance(c, _Add)]
                self._inbox.clear()
            for stream in pending + list(self._streams.values()):
                stream._put(EngineDeadError("the engine stopped"))
            self._streams.clear()

    def _next_commands(self) -> bool:
        """Apply queued adds and aborts, sleeping while there is nothing at all to do.
        Returns False when it is time to stop."""
        with self._wakeup:
            while not (self._inbox or self._stopping or self.engine.has_unfinished_requests()):
                self._wakeup.wait()
            if self._stopping:
                return False
            commands = list(self._inbox)
            self._inbox.clear()
        for command in commands:
            if isinstance(command, _Add):
                self._add(command)
            else:
                self._abort(command.request_id)
        return True

    def _add(self, command: _Add) -> None:
        stream = command.stream
        try:
            self.engine.add_request(command.prompt, command.params, stream.request_id)
        except Exception as e:  # a bad request fails alone
            stream._put(e)
            return
        self._streams[stream.request_id] = stream
        stream._put(_ACCEPTED)

    def _abort(self, request_id: str) -> None:
        output = self.engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if output is not None and stream is not None:
            stream._put(output)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # engine.step() fails requests itself, each alone where it can: this is a bug beyond
            # that. The engine cannot tell which requests it left half-done, so all of them end
            # as failed (counted as errors, not aborts) and the engine is left empty for the next
            # request. Should that fail too, the engine is broken beyond it: the exception ends the loop.
            log.exception("engine step failed; failing the %d running requests", len(self._streams))
            for request_id, stream in list(self._streams.items()):
                self.engine.fail_request(request_id)
                del self._streams[request_id]
                stream._put(_request_failed(request_id))
            return
        for output in outputs:
            stream = self._streams[output.request_id]
            failed = output.finished and output.outputs[0].finish_reason == "error"
            stream._put(_request_failed(output.request_id) if failed else output)
            if output.finished:
                del self._streams[output.request_id]


def _request_failed(request_id: str) -> RequestFailedError:
    # The exception's text stays in the server log (with the request id): the client sees none of it.
    return RequestFailedError(f"internal error: the engine failed while running request {request_id}")
