"""Request and response bodies of the three HTTP APIs (pydantic: FastAPI validates them and
publishes them at /<task>/docs). Malformed or mistyped bodies get 422 with the field named."""

import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from data_loaders.recsys import CONTEXT_TYPES, REASONS

Reason = Literal[REASONS]  # type: ignore[valid-type]
ContextType = Literal[CONTEXT_TYPES]  # type: ignore[valid-type]
# counts a session can hold: bounded, so no value reaches the model as inf or overflows int64
COUNT = 1_000_000
TrackId = Annotated[str, Field(min_length=1, max_length=200)]


def _calendar_date(value: str) -> str:
    datetime.date.fromisoformat(value)  # ValueError (-> 422 naming the field) for 2018-13-45
    return value


class Strict(BaseModel):
    # a misspelt field is a mistake to report, not a value to ignore
    model_config = ConfigDict(extra="forbid")


class Answer(BaseModel):
    version: str = Field(description="Registry version of the model that answered (canary releases).")


# ------------------------------------------------------------------ retinopathy


class RetinopathyRequest(Strict):
    image: str = Field(description="A fundus photograph, PNG or JPEG, base64-encoded.", min_length=1)


class RetinopathyResponse(Answer):
    grade: int = Field(description="ICDR grade 0-4 with the highest probability.")
    grade_name: str
    probabilities: list[float] = Field(description="Probability of each grade 0-4.")
    referable: bool = Field(description="Grade >= 2 (moderate NPDR or worse): refer to an ophthalmologist.")
    referable_probability: float


# ------------------------------------------------------------------ autonomous


class AutonomousRequest(Strict):
    images: list[str] = Field(
        description="The rig's 8 camera images in camera order (PNG/JPEG, base64), all of the model's size.",
        min_length=8,
        max_length=8,
    )
    score_threshold: float = Field(0.5, ge=0, le=1, description="Smallest object score returned.")


class DetectedObject(BaseModel):
    label: str
    score: float
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels of the camera image.")


class Lane(BaseModel):
    slot: int
    probability: float
    points: list[list[float]] = Field(description="(u, v) points in pixels, near to far.")


class CameraAnswer(BaseModel):
    camera: int
    objects: list[DetectedObject]
    lanes: list[Lane]


class DepthMap(BaseModel):
    stride: int = Field(description="Pixels of the camera image per depth value along each axis.")
    metres: list[list[list[float]]] = Field(description="[camera][row][column] depth in metres.")


class AutonomousResponse(Answer):
    cameras: list[CameraAnswer]
    depth: DepthMap


# ------------------------------------------------------------------ recsys


class Playback(Strict):
    """How a track started playing (MSSD logs it for every event, and it is known before the
    next track plays too)."""

    context_switch: bool = False
    no_pause_before_play: bool = True
    short_pause_before_play: bool = False
    long_pause_before_play: bool = False
    hist_user_behavior_is_shuffle: bool = False


class HistoryEvent(Playback):
    """A past event of the session as MSSD logs it (what happened to that track)."""

    track_id: TrackId
    skip_1: bool = False
    skip_2: bool = False
    skip_3: bool = False
    not_skipped: bool = True
    hist_user_behavior_n_seekfwd: int = Field(0, ge=0, le=COUNT)
    hist_user_behavior_n_seekback: int = Field(0, ge=0, le=COUNT)
    hist_user_behavior_reason_end: Reason = "trackdone"


class ListeningContext(Playback):
    """What is known before the next track plays."""

    date: Annotated[str, AfterValidator(_calendar_date)] = Field(
        "2018-07-15", pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", description="YYYY-MM-DD, a calendar date"
    )
    hour_of_day: int = Field(12, ge=0, le=23)
    premium: bool = True
    context_type: ContextType = "user_collection"
    hist_user_behavior_reason_start: Reason = "trackdone"
    session_position: int = Field(2, ge=1, le=COUNT)
    session_length: int = Field(20, ge=1, le=COUNT)


class RecsysRequest(Strict):
    history: list[HistoryEvent] = Field(description="The session so far, oldest first.", max_length=1000)
    context: ListeningContext = ListeningContext()
    candidates: list[TrackId] = Field(description="Track ids to rank.", min_length=1, max_length=1000)


class RankedTrack(BaseModel):
    track_id: str
    rank: int
    play_probability: float
    cold: bool = Field(description="Released after training: scored from its content alone.")


class RecsysResponse(Answer):
    ranked: list[RankedTrack]
