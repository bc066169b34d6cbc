"""The shapes of the JSON the API answers with; FastAPI turns them into the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Color = list[int]


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong, in one line.")


class ClassShareOut(BaseModel):
    id: int = Field(ge=0, description="Class id (the value in the label map).")
    name: str
    pixels: int = Field(ge=0, description="Pixels of this class in the image.")
    share: float = Field(ge=0, le=1, description="Share of the image (0–1).")
    color: Color = Field(min_length=3, max_length=3, description="RGB colour in the overlay.")


class Timings(BaseModel):
    decode_ms: float
    preprocess_ms: float
    model_ms: float
    postprocess_ms: float
    total_ms: float = Field(description="decode + preprocess + model + postprocess.")
    queue_ms: float = Field(description="Waiting for a free worker.")
    encode_ms: float = Field(description="Encoding the returned PNGs.")
    server_ms: float = Field(description="From the upload being received to the answer.")


class ImageOut(BaseModel):
    media_type: str
    base64: str | None = Field(None, description="The file, base64-encoded (output=inline).")
    url: str | None = Field(
        None, description="Where to fetch the file until it expires (output=url)."
    )


class SegmentResponse(BaseModel):
    model: str
    mode: str = Field(description="Inference mode, e.g. 'whole' or 'slide 512×512 / 341×341'.")
    width: int
    height: int
    num_labels: int
    domain: str | None = Field(None, description="What the model is for, in words.")
    out_of_domain: bool | None = Field(
        None,
        description="True when the picture does not look like the model's training data "
        "(domain_score above the model's threshold): the classes are then likely wrong. "
        "None for models without a measured threshold.",
    )
    domain_score: float | None = Field(
        None, description="How unlike the training data the picture looks (higher: less alike)."
    )
    classes: list[ClassShareOut] = Field(description="Classes present, largest first.")
    timings: Timings
    images: dict[str, ImageOut] = Field(
        description="The requested pictures: label_map (palette PNG, pixel value = class id), "
        "overlay (photo blended with class colours), colored (class colours only)."
    )
    expires_at: float | None = Field(
        None, description="Unix time after which the URLs stop working."
    )


class ModelInfo(BaseModel):
    name: str
    default: bool
    loaded: bool = Field(description="False for a model not used yet; its details come once it is.")
    variant: str | None = None
    parameters: int | None = None
    num_labels: int | None = None
    labels: list[str] | None = None
    palette: list[Color] | None = None
    palette_source: str | None = None
    domain: str | None = Field(None, description="What the model is for, in words.")
    out_of_domain: dict[str, Any] | None = Field(
        None, description="The out-of-domain warning's score, threshold and calibration."
    )
    source: str | None = None
    license: str | None = None
    metrics: dict[str, Any] | None = None
    preprocessing: dict[str, Any] | None = Field(
        None, description="preprocessor_config.json of the model."
    )
    mode: dict[str, Any] | None = None
    modes: list[str] | None = None
    device: str | None = None
    backend: str | None = None
    precision: str | None = None


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class QueueState(BaseModel):
    in_flight: int = Field(description="Tasks running or waiting.")
    capacity: int = Field(description="Tasks accepted at once; beyond this, 503.")


class ModelState(BaseModel):
    name: str
    loaded: bool


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    request_timeout_s: float
    video_max_upload_bytes: int
    video_max_frames: int
    video_max_pixels: int


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    models: list[ModelState]
    images: QueueState
    videos: QueueState
    limits: Limits


class VideoSummary(BaseModel):
    frames: int
    width: int
    height: int
    fps: float
    codec: str
    seconds: float
    frames_per_second: float | None
    model_ms_per_frame: float
    class_shares: dict[str, float] = Field(description="Mean share of each class over all frames.")


class VideoLinks(BaseModel):
    status: str
    result: str
    frames: str
    frames_csv: str


class VideoJobOut(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    model: str
    filename: str
    format: Literal["mp4", "webm"]
    frames_done: int
    total_frames: int | None = Field(description="None when the container does not say.")
    progress: float | None = Field(description="0–1; None while the frame count is unknown.")
    width: int | None
    height: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None = Field(description="Unix time the job and its files are removed.")
    error: str | None
    result: VideoSummary | None
    links: VideoLinks


class FrameRow(BaseModel):
    frame: int
    time_s: float
    model_ms: float
    shares: list[float] = Field(description="Each class's share of the frame, in label order.")


class FrameStats(BaseModel):
    labels: list[str]
    frames: list[FrameRow]


class BenchResults(BaseModel):
    available: bool
    modified_at: float | None = None
    results: dict[str, Any] | None = Field(None, description="The JSON `segformer bench` wrote.")
    message: str | None = None
