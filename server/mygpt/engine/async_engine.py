"""The asyncio face of the engine: events cross threads with loop.call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from mygpt.engine.engine import Engine
from mygpt.engine.types import GenerationRequest, TokenEvent


class AsyncEngine:
    """Wraps an Engine for asyncio callers; never touches tensors."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def submit(
        self, request: GenerationRequest, on_done: Callable[[list[TokenEvent]], None] | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Queues the request now (raising EngineOverloaded at once) and returns its event stream.

        Leaving the iterator early (client disconnect, cancellation) aborts the request. `on_done` gets
        the final event of every choice, from the engine thread, however the request ends (finished,
        aborted, failed), whether or not anybody still reads the stream: accounting hangs on it.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        finals: list[TokenEvent] = []

        def on_event(event: TokenEvent) -> None:
            if event.finish_reason is not None and on_done is not None:
                finals.append(event)
                if len(finals) == request.params.n:
                    on_done(sorted(finals, key=lambda e: e.index))
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        self.engine.submit(request, on_event)
        return self._stream(request, events)

    def abort(self, request_id: str) -> None:
        """Cancels a submitted request whose event stream was never read (reading it and leaving early
        aborts by itself)."""
        self.engine.abort(request_id)

    async def _stream(self, request: GenerationRequest, events: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        open_choices = request.params.n
        try:
            while open_choices:
                event = await events.get()
                if event.finish_reason is not None:
                    open_choices -= 1
                yield event
        finally:
            if open_choices:
                self.engine.abort(request.request_id)
