"""One root exception; handlers and adapters raise its two families.

`RetryableError` goes through the task's retry policy (a transient failure: a
network blip, a rate limit, a service that is briefly down). `PermanentError`
ends the attempt in ERROR at once (bad data, bad config, a bug). Anything else a
handler raises is treated as retryable, because an unknown failure is more often
transient than not and the retry policy bounds the cost.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Root of every error this package raises on purpose."""


class RetryableError(OrchestratorError):
    """A transient failure: try again later."""


class PermanentError(OrchestratorError):
    """A failure that no retry can fix."""


class InvalidInput(PermanentError):
    """A message, event or command that can never succeed (acknowledge and log it)."""


class NotFound(InvalidInput):
    """An unknown pipeline, batch or task."""


class PipelineValidationError(InvalidInput):
    """A pipeline definition with one or more problems; `problems` lists each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class PipelineConflict(InvalidInput):
    """A pipeline file names a pipeline that another file defines."""


class InfrastructureError(RetryableError):
    """The database or the message bus is unreachable: the caller should redeliver."""
