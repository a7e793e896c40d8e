"""A folder of buckets: `gs://bucket/a/b.parquet` is `<root>/bucket/a/b.parquet`.

The embedded runtime's stand-in for GCS. Object names keep their slashes as
folders, so users can drop files in by hand and DuckDB can glob them.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from orchestrator.errors import PermanentError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$")


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, object name) of a `gs://` URI; the name may be empty (a bucket prefix)."""
    if not isinstance(uri, str) or not uri.startswith("gs://"):
        raise PermanentError(f"not a gs:// URI: {uri!r}")
    bucket, _, name = uri[5:].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise PermanentError(f"invalid bucket name {bucket!r} in {uri!r}")
    return bucket, name


class LocalObjectStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, uri: str) -> Path:
        """The local path of a URI; never outside the bucket's folder."""
        bucket, name = split_uri(uri)
        parts = [p for p in name.split("/") if p]
        if any(p in (".", "..") for p in parts) or "\\" in name or "\0" in name:
            raise PermanentError(f"object name {name!r} in {uri!r} is not allowed locally")
        return self.root.joinpath(bucket, *parts)

    def list(self, uri_prefix: str) -> list[str]:
        bucket, prefix = split_uri(uri_prefix)
        base = self.root / bucket
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                rel = (Path(dirpath) / f).relative_to(base).as_posix()
                if rel.startswith(prefix) and not _is_temp(f):
                    out.append(f"gs://{bucket}/{rel}")
        return sorted(out)

    def read(self, uri: str) -> bytes:
        path = self.path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise PermanentError(f"no such object: {uri}") from exc

    def write(self, uri: str, data: bytes) -> None:
        path = self.path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader (or a glob in a load) never sees half an object.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, uri: str) -> bool:
        return self.path(uri).is_file()


def _is_temp(filename: str) -> bool:
    return filename.startswith(".tmp-") and filename.endswith(".part")
