"""What the trainer keeps, typed once: the API's bodies, the catalogue's rows and the client's answers.

Pydantic models shared by the server (``api.py``), the typed client the daemon uses (``client.py``)
and the catalogue (``storage``). Times are seconds since the epoch (floats); ids are strings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Why the appliance kept (and sends) a frame: the frame store's reasons.
Reason = Literal["reject", "error", "sample", "label", "drift"]
Verdict = Literal["ok", "ng", "error"]
JobStatus = Literal["awaiting_approval", "queued", "running", "succeeded", "failed", "refused", "cancelled"]
JobReason = Literal["drift", "schedule", "request"]
ModelStatus = Literal["candidate", "published", "refused"]
Policy = Literal["approve", "auto"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Appliance(_Record):
    """A device registered with the trainer; it holds one token (only its hash is kept)."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    name: str = ""
    created_at: float
    last_seen: float | None = None


class Camera(_Record):
    """One camera of one appliance, as the trainer knows it: its running model, drift, rebuild policy."""

    appliance_id: str
    camera_id: str
    model_id: str | None = None
    drift_state: str | None = None
    drift_at: float | None = None
    policy: Policy = "approve"
    backend: str | None = Field(None, description="scorer of rebuilds; None: the running model's, else the config's")
    settings: dict[str, Any] = Field(default_factory=dict, description="fit settings of rebuilds (scorer, size...)")
    schedule: str | None = Field(None, description="cron expression of scheduled rebuilds, e.g. '0 3 * * 0'")
    updated_at: float | None = None


class FrameMeta(_Record):
    """A frame the appliance kept, with its audit metadata (the bytes travel separately, keyed by sha256)."""

    camera_id: str
    inspection_id: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    suffix: str = Field(pattern=r"^\.[a-z0-9]{1,5}$")
    size: int = Field(ge=1)
    captured_at: float
    verdict: Verdict
    score: float | None = None
    raw_score: float | None = None
    threshold: float | None = None
    model_id: str | None = None
    reasons: list[Reason] = Field(default_factory=list)


class Frame(FrameMeta):
    """A frame in the catalogue: the metadata plus whose it is, where its bytes are and when they arrived."""

    appliance_id: str
    blob: str = Field(description="the blob store key of its bytes")
    uploaded_at: float


class Label(_Record):
    """An operator's label, as the appliance recorded it (its id is the appliance's label id)."""

    id: str
    camera_id: str
    inspection_id: str
    label: Literal["good", "defect"]
    note: str | None = None
    who: str
    at: float
    undone_at: float | None = None


class DriftEvent(_Record):
    """A drift raised or cleared on a camera, with the window's statistics (its id is the appliance's event id)."""

    id: str
    camera_id: str
    kind: Literal["drift_raised", "drift_cleared"]
    at: float
    stats: dict[str, Any] = Field(default_factory=dict)


class DatasetRule(_Record):
    """How a dataset version is drawn from the frames: reproducible from the rule and the frames up to ``until``."""

    since: float | None = None
    until: float
    max_good: int = Field(2000, ge=1, description="most good frames kept (the newest first)")
    outlier_quantile: float = Field(0.99, gt=0, le=1, description="good frames scoring above this quantile of the "
                                                                   "good frames' scores under the running model are "
                                                                   "dropped (1: none)")
    eval_share: float = Field(0.2, ge=0, lt=1, description="share of good frames held out for the gate")
    normal_since: float | None = Field(None, description="frames captured from then on are good whatever the "
                                                         "running model said (an accepted drift: the new normal)")


class DatasetMember(_Record):
    """One frame's place in a dataset version."""

    frame: str = Field(description="the frame's blob key")
    inspection_id: str
    split: Literal["train", "eval_good", "eval_defect"]


class Dataset(_Record):
    """A version of a camera's dataset: the rule it was drawn by, its members' hash, and counts per split."""

    id: int
    appliance_id: str
    camera_id: str
    version: int
    rule: DatasetRule
    digest: str = Field(description="sha256 over the sorted members: equal digests, equal datasets")
    counts: dict[str, int]
    created_at: float


class Job(_Record):
    """A rebuild of one camera's model."""

    id: int
    appliance_id: str
    camera_id: str
    reason: JobReason
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    dataset_id: int | None = None
    model_id: str | None = None
    detail: str | None = None
    approved_by: str | None = None


class Model(_Record):
    """A bundle the trainer built (or the one an appliance runs), and whether it was published."""

    id: str = Field(description="the bundle's model id")
    appliance_id: str
    camera_id: str
    status: ModelStatus
    created_at: float
    dataset_id: int | None = None
    job_id: int | None = None
    bundle: str | None = Field(None, description="blob key of the bundle archive")
    detail: str | None = None


class Evaluation(_Record):
    """The gate's verdict on a candidate model against the running one, on held-out production frames."""

    id: int
    model_id: str
    baseline_model_id: str | None
    dataset_id: int
    passed: bool
    metrics: dict[str, Any] = Field(description="per model: image AUROC, false-reject rate, escape rate at the "
                                                "calibrated threshold; golden parity; the margins applied")
    created_at: float
