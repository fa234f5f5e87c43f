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
    scores: list[float] = Field(description="one per image, in order: cosine similarity to the identity's "
                                            "template (after the deployment's noise and rounding), or 1.0 / 0.0 "
                                            "when the output is a decision")
    output: Literal["similarity", "decision"] = "similarity"
    queries_used: int = Field(description="this key's images scored, this request included")
    budget_left: int | None


class UsageResponse(Body):
    key_id: str
    role: str
    requests: int
    queries: int
    rejected: int
    budget_left: int | None


class FlagInfo(Body):
    key_id: str
    time: str
    queries: int = Field(description="the key's images scored when it was flagged")
    distance: float = Field(description="the flagged batch's smallest mean k-NN distance")
    blocked: bool


class Stats(Body):
    defenses: list[str] = Field(description="the defenses this deployment runs")
    rejections: dict[str, int] = Field(description="refused requests by error code")
    flags: list[FlagInfo]
