"""The request bodies the server accepts (OpenAI's chat completions and videos APIs) and its errors.

Field names and ranges follow OpenAI's API; `top_k`, `ignore_eos`, `negative_prompt`, `steps`, `guidance_scale`,
`frames` and `seed` on videos are extensions (as vLLM adds `top_k`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from haplo.errors import HaploError


class ApiError(HaploError):
    """An OpenAI-style error: HTTP status, message, type, the offending parameter and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.headers: dict[str, str] = {}

    @property
    def type(self) -> str:
        return {404: "not_found_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class URLRef(BaseModel):
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: URLRef | None = None
    video_url: URLRef | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = True


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)  # 0 or -1: off
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)  # one string or up to 4
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False  # decode max_tokens tokens whatever the model says (benchmarks)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class VideoCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(min_length=1)
    model: str | None = None
    negative_prompt: str = ""
    size: str | None = None  # "WIDTHxHEIGHT"
    seconds: float | None = Field(default=None, gt=0)
    frames: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    seed: int = 0

    def dimensions(self) -> tuple[int | None, int | None]:
        """(width, height) from `size`, or (None, None) for the model's default."""
        if self.size is None:
            return None, None
        width, _, height = self.size.lower().partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) < 1 or int(height) < 1:
            raise ApiError(400, f"size {self.size!r}: give WIDTHxHEIGHT in pixels, e.g. 64x64", "size")
        return int(width), int(height)


def parse(model: type[BaseModel], body: object) -> BaseModel:
    """Validate a JSON body; the first problem becomes one 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", where) from None
