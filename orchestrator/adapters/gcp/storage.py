"""Google Cloud Storage as the object store.

URIs in and out name buckets logically (`gs://landing/…`); `names` maps them to
the real buckets. The client honours `STORAGE_EMULATOR_HOST` by itself;
`client_options` is for pointing at an endpoint explicitly (tests). Imported
lazily, like every Google client here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.adapters.local.object_store import split_uri
from orchestrator.errors import PermanentError, RetryableError
from orchestrator.names import NameMap


class GcsObjectStore:
    def __init__(
        self,
        project: str | None = None,
        *,
        client: Any = None,
        client_options: Mapping[str, Any] | None = None,
        credentials: Any = None,
        timeout_s: float = 60.0,
        names: NameMap | None = None,
    ):
        self._project = project
        self.names = names or NameMap()
        self._client = client
        self._client_options = dict(client_options) if client_options else None
        self._credentials = credentials
        self.timeout_s = timeout_s

    @property
    def client(self) -> Any:
        if self._client is None:
            from google.cloud import storage  # type: ignore[attr-defined,unused-ignore]

            self._client = storage.Client(
                project=self._project, credentials=self._credentials,
                client_options=self._client_options,
            )
        return self._client

    def _blob(self, uri: str) -> Any:
        bucket, name = split_uri(self.names.real_uri(uri))
        if not name:
            raise PermanentError(f"{uri!r} names a bucket, not an object")
        return self.client.bucket(bucket).blob(name)

    def list(self, uri_prefix: str) -> list[str]:
        logical, prefix = split_uri(uri_prefix)
        try:
            blobs = self.client.list_blobs(self.names.real_bucket(logical), prefix=prefix or None,
                                           timeout=self.timeout_s)
            return sorted(f"gs://{logical}/{b.name}" for b in blobs)
        except Exception as exc:
            raise _translate(exc, uri_prefix) from exc

    def read(self, uri: str) -> bytes:
        try:
            return bytes(self._blob(uri).download_as_bytes(timeout=self.timeout_s))
        except Exception as exc:
            raise _translate(exc, uri) from exc

    def write(self, uri: str, data: bytes) -> None:
        try:
            self._blob(uri).upload_from_string(data, timeout=self.timeout_s)
        except Exception as exc:
            raise _translate(exc, uri) from exc

    def exists(self, uri: str) -> bool:
        try:
            return bool(self._blob(uri).exists(timeout=self.timeout_s))
        except Exception as exc:
            raise _translate(exc, uri) from exc

    def generation(self, uri: str) -> int | None:
        """The object's current generation (for job ids that follow a re-upload)."""
        bucket, name = split_uri(self.names.real_uri(uri))
        try:
            blob = self.client.bucket(bucket).get_blob(name, timeout=self.timeout_s)
        except Exception as exc:
            raise _translate(exc, uri) from exc
        return None if blob is None else int(blob.generation)


def _translate(exc: Exception, uri: str) -> Exception:
    from google.api_core import exceptions as gexc

    if isinstance(exc, PermanentError | RetryableError):
        return exc
    if isinstance(exc, gexc.NotFound):
        return PermanentError(f"no such object or bucket: {uri}")
    if isinstance(exc, gexc.TooManyRequests | gexc.ServerError | gexc.RetryError):
        return RetryableError(f"GCS: {exc}")
    if isinstance(exc, gexc.ClientError):
        return PermanentError(f"GCS: {exc}")
    if isinstance(exc, ConnectionError | OSError):
        return RetryableError(f"GCS: {exc}")
    return exc
