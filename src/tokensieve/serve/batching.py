"""The batching policy: which waiting requests run together.

With ``max_batch`` > 1 the worker takes the next request and every waiting request that can share its batch
(:meth:`BatchPolicy.joins`: same method and parameters, a method whose ``capabilities`` say ``batch``,
sampling one batch can draw with, no long prefix for the prefix cache), up to ``max_batch``, in arrival
order; the others keep their place. Pure policy: no threads, no model.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, TypeVar

from tokensieve.errors import check_int

if TYPE_CHECKING:
    from tokensieve.serve.requests import PreparedRequest

# A request whose prompt prefix for the prefix cache (docs/prefix_cache.md) has this many tokens or more runs
# alone, through the cache: a long shared prefix (a document) saves more prefill than sharing decoding steps
# saves; a shorter one (a chat template's system prompt) saves little, so such requests batch without the cache.
PREFIX_ALONE_TOKENS = 128

J = TypeVar("J")  # a queued item with a ``prepared`` request (serve.jobs.Job)


class BatchPolicy:
    """Up to ``max_batch`` requests per run (1: one at a time)."""

    def __init__(self, max_batch: int = 1) -> None:
        self.max_batch = check_int("max_batch", max_batch, 1, note=" (1 = one request at a time)")

    @staticmethod
    def batchable(prep: PreparedRequest) -> bool:
        """Whether ``prep`` may run in a batch: a method whose capabilities say ``batch``, and no prompt
        prefix of ``PREFIX_ALONE_TOKENS`` or more for the prefix cache (those run alone, through the cache); a
        selection-page request (``run.record_selection``) runs alone too (its per-layer record is of one prompt)."""
        if not prep.method.capabilities.batch or prep.run.record_selection:
            return False
        return prep.prefix_tokens is None or prep.prefix_tokens < PREFIX_ALONE_TOKENS

    def joins(self, head: PreparedRequest, other: PreparedRequest) -> bool:
        """Whether ``other`` may share ``head``'s batch: both batchable, the same method with the same
        parameters, and sampling settings one batch can draw with (``Sampling.batches_with``)."""
        return (
            self.batchable(head)
            and self.batchable(other)
            and head.method.name == other.method.name
            and head.method.params() == other.method.params()
            and head.sampling.batches_with(other.sampling)
        )

    def take(self, waiting: deque[J]) -> list[J]:
        """The next job of ``waiting`` (non-empty) and every waiting job that can share its batch (up to
        ``max_batch``), in arrival order, removed from ``waiting``; jobs that cannot join keep their place."""
        head = waiting.popleft()
        batch = [head]
        if self.max_batch > 1 and self.batchable(head.prepared):  # type: ignore[attr-defined]
            for job in list(waiting):
                if len(batch) >= self.max_batch:
                    break
                if self.joins(head.prepared, job.prepared):  # type: ignore[attr-defined]
                    waiting.remove(job)
                    batch.append(job)
        return batch
