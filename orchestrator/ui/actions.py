"""What the UI's buttons do: the runtime calls that `orchestrator batch start|retry|cancel`
make, with the same validation and the same messages, so a batch behaves the same
whichever way it was touched.

On the embedded runtime the work runs in the UI's own process (its bus and sweeper),
as `orchestrator dev` would run it; on Google Cloud (ORCHESTRATOR_GCP_PROJECT and
DATABASE_URL set) the runtime publishes to Pub/Sub and the deployed functions run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import InvalidInput
from orchestrator.identifiers import NAME_RE, valid_batch_id

MAX_PARAMS = 100


@dataclass(frozen=True)
class Done:
    message: str


class Actions(Protocol):
    def start(self, pipeline: str, batch_id: str, params: dict[str, str]) -> Done: ...
    def retry(self, pipeline: str, batch_id: str, task: str | None) -> Done: ...
    def cancel(self, pipeline: str, batch_id: str) -> Done: ...


def parse_params(text: str) -> dict[str, str]:
    """`key=value` per line (blank lines ignored), as `--param` takes them."""
    params: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"line {n} of the params is not key=value: {line.strip()[:80]!r}")
        params[key.strip()] = value.strip()
    if len(params) > MAX_PARAMS:
        raise InvalidInput(f"at most {MAX_PARAMS} params")
    return params


def check_batch_id(batch_id: str) -> str:
    if not valid_batch_id(batch_id):
        raise InvalidInput(
            f"invalid batch id {batch_id[:140]!r}: use 1 to 128 letters, digits and _ . - = : "
            "starting with a letter or digit")
    return batch_id


def check_task(task: str) -> str:
    if not NAME_RE.match(task):
        raise InvalidInput(f"invalid task name {task[:140]!r}")
    return task


class RuntimeActions:
    """The actions over a `Runtime` (`orchestrator.runtime`)."""

    def __init__(self, runtime: Any):
        self.rt = runtime

    def start(self, pipeline: str, batch_id: str, params: dict[str, str]) -> Done:
        check_batch_id(batch_id)
        if not self.rt.start_batch(pipeline, batch_id, params):
            raise InvalidInput(f"batch {pipeline}/{batch_id} already exists; "
                               "retry reruns its failed part")
        return Done(f"started {pipeline}/{batch_id}")

    def retry(self, pipeline: str, batch_id: str, task: str | None) -> Done:
        tasks = [check_task(task)] if task else None
        n = self.rt.retry(pipeline, batch_id, tasks)
        if n == 0 and not task:
            return Done(f"{pipeline}/{batch_id}: nothing failed, nothing to retry")
        what = f"{task} and its downstream" if task else "the failed part"
        return Done(f"{pipeline}/{batch_id}: retrying {what}, {n} task(s) queued again")

    def cancel(self, pipeline: str, batch_id: str) -> Done:
        n = self.rt.cancel(pipeline, batch_id)
        return Done(f"{pipeline}/{batch_id}: cancelled {n} open task(s)")
