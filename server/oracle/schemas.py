"""The bodies of the oracle's HTTP API (the contract attacks/oracle.py's client is written
against). Requests are validated by FastAPI with these models; responses use them too, so
/openapi.json documents both."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IDENTITY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(Body):
    error: str = Field(description="a short code, e.g. unauthorized, rate_limited, bad_shape")
    reason: str = Field(description="one line for a person")


class Health(Body):
    status: Literal["ok"] = "ok"
    backend: str
    identities: int


class EnrollRequest(Body):
    id: str = Field(pattern=IDENTITY_PATTERN)
    images: list[str] = Field(min_length=1, description="base64 PNG or JPEG, RGB, any size (aligned face crops)")


class EnrollResponse(Body):
    id: str
    images: int


class IdentityInfo(Body):
    id: str
    images: int
    created: str


class IdentityList(Body):
    identities: list[IdentityInfo]


class ArrayPayload(Body):
    dtype: str = Field(description="'uint8'")
    shape: list[int] = Field(description="[N, H, W, 3]; usually H = W = the backend's input side (112 for "
                                         "SFace), other sizes are resized like images")
    data: str = Field(description="base64 of the raw bytes, C order")


class SimilarityRequest(Body):
    images: list[str] | None = Field(None, description="base64 PNG or JPEG images")
    array: ArrayPayload | None = None

    @model_validator(mode="after")
    def _one_of(self) -> "SimilarityRequest":
        if (self.images is None) == (self.array is None):
            raise ValueError("give exactly one of 'images' and 'array'")
        if self.images is not None and not self.images:
            raise ValueError("'images' is empty")
        return self


class SimilarityResponse(Body):
    scores: list[float]
    queries_used: int = Field(description="this key's images scored, this request included")
    budget_left: int | None


class UsageResponse(Body):
    key_id: str
    role: str
    requests: int
    queries: int
    rejected: int
    budget_left: int | None
