"""``tokensieve serve``'s uvicorn server with a bounded, graceful shutdown.

uvicorn alone closes its listener at the first SIGTERM (so a load balancer's ``/health`` probe never sees
the 503), still starts queued requests and waits for running ones without bound; a second Ctrl-C cancels
every task mid-response (clients get a plain-text 500, streams no final event, the log hundreds of lines
of tracebacks). :class:`DrainingServer` instead, at the first SIGTERM or Ctrl-C:

1. keeps listening, and the engine *drains*: ``/health`` answers 503 ``draining``, new completion requests
   503 ``shutting_down``, requests queued but not started 503 at once;
2. lets the running requests finish, for at most ``shutdown_timeout_s``;
3. then ends those still running (a stream gets the error event and ``[DONE]``, a non-streamed request
   503) and stops uvicorn, which waits up to ``FLUSH_S`` for the last responses to be sent.

A second signal goes to step 3 at once; a third one exits without waiting for anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("uvicorn.error")

FLUSH_S = 3.0  # after the running requests were ended: time for their last events to reach the clients
POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` whose signals drain ``engine`` (``drain``, ``busy``, ``abort_running``) first."""

    def __init__(self, config: uvicorn.Config, engine: Any, shutdown_timeout_s: float) -> None:
        if not shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {shutdown_timeout_s!r}")
        config.timeout_graceful_shutdown = FLUSH_S
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self.signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._abort = asyncio.Event()

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._abort = asyncio.Event()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """A signal handler (main thread, between two steps of the event loop): never re-raised at exit, so
        the process ends with status 0 and no ``KeyboardInterrupt`` traceback."""
        self.signals += 1
        loop = self._loop
        if loop is None or not self.started:  # still starting (or already stopped): uvicorn's own way
            self.should_exit = True
            return
        if self.signals == 1:
            loop.call_soon_threadsafe(self._begin_drain)
        elif self.signals == 2:
            loop.call_soon_threadsafe(self._abort.set)
        else:
            self.should_exit = self.force_exit = True

    def _begin_drain(self) -> None:
        log.info(
            "Draining: new requests get 503, queued ones were answered 503; waiting up to %g s for %s",
            self.shutdown_timeout_s,
            "the running request(s)" if self.engine.busy else "nothing (none running)",
        )
        self.engine.drain()
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        end = time.monotonic() + self.shutdown_timeout_s
        while self.engine.busy and time.monotonic() < end and not self._abort.is_set():
            try:
                await asyncio.wait_for(self._abort.wait(), timeout=min(POLL_S, max(0.0, end - time.monotonic())))
            except asyncio.TimeoutError:
                pass
        if self.engine.busy:
            why = "a second signal" if self._abort.is_set() else f"the shutdown timeout ({self.shutdown_timeout_s:g} s)"
            n = self.engine.abort_running()
            log.warning(
                "Ending %d running request(s) after %s: they get a 503 error (streams: an error event and [DONE])",
                n,
                why,
            )
        self.should_exit = True
