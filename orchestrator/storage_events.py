"""A finalized GCS object, as the core sees it (parsed at the edge)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StorageObject(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    bucket: str = Field(min_length=3, max_length=222, pattern=r"^[a-z0-9][a-z0-9._\-]*[a-z0-9]$")
    name: str = Field(min_length=1, max_length=1024)
    generation: str = "0"
    size: int = Field(default=0, ge=0)

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    def as_trigger(self) -> dict[str, object]:
        return {"uri": self.uri, "bucket": self.bucket, "name": self.name,
                "generation": self.generation, "size": self.size}
