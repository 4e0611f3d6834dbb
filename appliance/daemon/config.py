"""The daemon's configuration: one TOML file, validated strictly before anything starts.

Pydantic models with ``extra="forbid"``: an unknown key, a wrong type or an inconsistent
setting is reported with the file, the key and the reason, and the daemon does not start
(on a reload, the old configuration keeps running). Each source and output keeps its own
config class beside its code; this module combines them into one type, discriminated by
``type``. Relative paths are taken relative to the state folder, never to the working
directory (under systemd that is ``/``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from .audit import AuditConfig
from .defaults import DEFAULT_CACHE, DEFAULT_SOCKET, DEFAULT_STATE
from .disk import DiskConfig
from .drift_watch import DriftConfig
from .metrics import MetricsConfig
from .publishers import PUBLISHERS
from .sources import SOURCES
from .threshold_rule import LearningConfig
from .thresholds import ThresholdsConfig, TimeZoneName

_CAMERA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Strict):
    """Where the daemon keeps things on the device."""

    state: Path = Field(DEFAULT_STATE, description="state: bundles, the audit database, overlays, operator "
                                                   "thresholds; relative paths elsewhere in the file are under it")
    cache: Path = Field(DEFAULT_CACHE, description="caches: the OpenVINO model cache and Numba's compiled kernels")

    @field_validator("state", "cache")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"{str(value)!r} must be an absolute path")
        return value


class Control(_Strict):
    """The local control socket (``appliance status``, ``reload``, ``threshold``, ``trigger``)."""

    socket: Path = Field(DEFAULT_SOCKET, description="Unix socket path")
    mode: str = Field("0660", pattern=r"^0?[0-7]{3}$", description="file mode of the socket (octal): who may "
                                                                    "connect is decided by it and the group")
    group: str | None = Field(None, description="group owning the socket (None: the daemon's own group)")


class Runtime(_Strict):
    """How inference uses the CPU."""

    threads: int | None = Field(None, ge=1, description="CPU threads for the backbone and kernels (None: all)")
    streams: int = Field(2, ge=1, le=8, description="asynchronous backbone requests per camera: 2 overlaps one "
                                                     "frame's scoring with the next frame's backbone")
    warmup_frames: int = Field(2, ge=0, description="frames scored at start-up before READY (compile, caches)")
    stop_timeout_s: float = Field(20.0, gt=0, le=300, description="an orderly stop (SIGTERM) takes at most this "
                                                                  "long: queued frames are inspected and outputs "
                                                                  "drain until then, what is left is recorded as "
                                                                  "not done; keep it below the unit's "
                                                                  "TimeoutStopSec (60)")


class Watchdog(_Strict):
    """When a camera counts as stalled (the systemd watchdog is fed only while no camera is)."""

    stall_s: float = Field(15.0, gt=0, description="a camera whose oldest waiting frame has waited this long for "
                                                   "its result (or whose threads stopped turning) is stalled: its "
                                                   "Ready drops and the watchdog is no longer fed; an idle "
                                                   "triggered camera is not stalled")


class Trigger(_Strict):
    """When a camera takes a frame."""

    mode: Literal["free_run", "external"] = Field("free_run", description="free_run: continuously; external: "
                                                                          "one frame per trigger (control socket, "
                                                                          "PLC)")
    fps: float | None = Field(None, gt=0, description="free_run: at most this many frames per second "
                                                      "(None: as fast as the source delivers)")
    timeout_s: float = Field(5.0, gt=0, description="external: a trigger with no frame within this becomes an "
                                                    "error result")


class CameraOverlay(_Strict):
    """Per-camera overlay options (override the overlay output's)."""

    enabled: bool = Field(True, description="write overlay files for this camera")
    only_ng: bool | None = Field(None, description="keep only NG and error overlays (None: the output's setting)")
    keep: int | None = Field(None, ge=1, description="overlay files kept for this camera (None: the output's)")
    max_mb: float | None = Field(None, gt=0, description="disk budget in MiB (None: the output's)")


def _source_union() -> Any:
    configs = tuple(cls.Config for cls in SOURCES.values())
    return Annotated[configs[0] if len(configs) == 1 else _union(configs), Field(discriminator="type")]


def _output_union() -> Any:
    configs = tuple(cls.Config for cls in PUBLISHERS.values())
    return Annotated[configs[0] if len(configs) == 1 else _union(configs), Field(discriminator="type")]


def _union(types: tuple[type, ...]) -> Any:
    from typing import Union

    return Union[types]  # noqa: UP007 - built from the registries at import time


class Camera(_Strict):
    """One camera: where frames come from, which model judges them, with which thresholds."""

    id: str = Field(description="camera id: letters, digits, - and _ (used in file names, topics, registers)")
    bundle: Path = Field(description="model bundle folder or archive (relative: under the state folder)")
    source: _source_union() = Field(description="where frames come from; 'type' picks the kind")  # type: ignore[valid-type]
    trigger: Trigger = Field(default_factory=Trigger, description="free-running or externally triggered")
    thresholds: ThresholdsConfig = Field(default_factory=ThresholdsConfig,
                                         description="camera and per-shift thresholds on the normalised scale")
    overlay: CameraOverlay = Field(default_factory=CameraOverlay, description="overlay and retention options")
    queue: int = Field(4, ge=1, le=256, description="frames waiting for inference; when full the oldest is "
                                                    "dropped and counted")
    enabled: bool = Field(True, description="inspect this camera")
    max_frame_megapixels: float | None = Field(None, gt=0, le=1000,
                                               description="files larger than this are refused from their header, "
                                                           "before decoding (None: 4x the bundle's frame, at least "
                                                           "1 MP)")
    slots: dict[str, Path] = Field(default_factory=dict, description="bundle slots a PLC or the control socket "
                                                                      "may switch to ('bundle' command): slot "
                                                                      "number -> bundle path")

    @field_validator("slots")
    @classmethod
    def _slots(cls, value: dict[str, Path]) -> dict[str, Path]:
        bad = [k for k in value if not (k.isdecimal() and 1 <= int(k) <= 65534)]
        if bad:
            raise ValueError(f"slot names must be numbers 1-65534, got {bad}")
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _CAMERA_ID.match(value):
            raise ValueError(f"camera id {value!r} must be 1-32 letters, digits, '-' or '_', starting with a "
                             "letter or digit")
        return value


class DaemonConfig(_Strict):
    """The whole configuration file."""

    timezone: TimeZoneName = Field("UTC", description="IANA time zone of the shift schedules, e.g. Europe/Berlin")
    paths: Paths = Field(default_factory=Paths, description="state and cache folders")
    runtime: Runtime = Field(default_factory=Runtime, description="CPU use")
    control: Control = Field(default_factory=Control, description="the local control socket")
    watchdog: Watchdog = Field(default_factory=Watchdog, description="stall detection")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="the SQLite audit log (and outbox)")
    disk: DiskConfig = Field(default_factory=DiskConfig, description="the free-space floor of file-writing outputs")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics")
    learning: LearningConfig = Field(default_factory=LearningConfig,
                                     description="what operator labels change: the memory bank and thresholds")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="the drift watch of every camera")
    outputs: list[_output_union()] = Field(default_factory=list,  # type: ignore[valid-type]
                                           description="outputs; each [[outputs]] table has a 'type'")
    cameras: list[Camera] = Field(min_length=1, description="the cameras; each [[cameras]] table is one")

    @model_validator(mode="after")
    def _cross_checks(self) -> DaemonConfig:
        ids = [c.id for c in self.cameras]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"camera ids must be unique; repeated: {twice}")
        kinds = [o.type for o in self.outputs]
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"each output type may appear once; repeated: {repeated}")
        return self

    def state_path(self, path: Path) -> Path:
        """An absolute path: relative ones are under the state folder."""
        return path if path.is_absolute() else self.paths.state / path

    def camera(self, camera_id: str) -> Camera:
        """The camera with this id, or ``ConfigError``."""
        for camera in self.cameras:
            if camera.id == camera_id:
                return camera
        raise ConfigError(f"no camera {camera_id!r}; configured: {[c.id for c in self.cameras]}")


def _where(loc: tuple[Any, ...], data: dict) -> str:
    """A dotted key for an error location, naming list items by their ``id``/``type`` where they have one."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            node = node[item]
            label = node.get("id") or node.get("type") if isinstance(node, dict) else None
            parts[-1] = f"{parts[-1]}[{item}]" + (f"({label})" if label else "")
            continue
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def parse_config(data: dict, origin: str = "<config>") -> DaemonConfig:
    """Validate a parsed TOML document; ``ConfigError`` lists every problem as ``origin: key: reason``."""
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x in _discriminator_tags()))
            key = _where(loc, data) or "(top level)"
            reason = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                reason = "unknown key (check its spelling and section)"
            lines.append(f"{origin}: {key}: {reason}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def _discriminator_tags() -> set[str]:
    return set(SOURCES) | set(PUBLISHERS)


def load_config(path: str | Path) -> DaemonConfig:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file; write one with 'appliance config example > {path}'") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path))


def check_files(config: DaemonConfig, origin: str = "<config>") -> list[str]:
    """Problems a valid config can still have on this machine, as ``origin: key: reason`` lines.

    Each enabled camera's bundle (and slot bundles) must exist and be a bundle (its manifest is
    read, not every file verified: ``appliance doctor`` does that). ``config check`` reports these;
    ``run`` would stop at the first with the same words.
    """
    from ..bundle import read_manifest
    from ..errors import BundleError

    problems = []
    for i, camera in enumerate(config.cameras):
        if not camera.enabled:
            continue
        where = f"cameras[{i}]({camera.id})"
        for key, bundle in [("bundle", camera.bundle), *((f"slots.{k}", v) for k, v in camera.slots.items())]:
            path = config.state_path(bundle)
            if not path.exists():
                problems.append(f"{origin}: {where}.{key}: {path} does not exist")
            elif path.is_dir():
                try:
                    read_manifest(path)
                except BundleError as exc:
                    problems.append(f"{origin}: {where}.{key}: {exc}")
    return problems
