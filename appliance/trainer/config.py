"""The trainer's configuration: one TOML file (``/etc/anomaly-appliance/trainer.toml``), validated strictly.

The same file serves ``appliance trainer serve`` (the API and the page) and ``appliance trainer
worker`` (rebuild jobs, on any machine that reaches the storage): storage and queue come from it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from ..errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddedStorageConfig(_Strict):
    """SQLite and files in one folder: a trainer on a laptop, no server to run."""

    type: Literal["embedded"] = "embedded"
    folder: Path = Field(Path("/var/lib/anomaly-trainer"), description="catalogue.db, blobs/ and jobs.db live here")


class S3Config(_Strict):
    """An S3-compatible object store (AWS, MinIO, SeaweedFS, Ceph)."""

    endpoint: str = Field(description="e.g. http://127.0.0.1:8333")
    bucket: str = Field(min_length=3, max_length=63)
    access_key: str
    secret_key: SecretStr | None = None
    secret_key_file: Path | None = Field(None, description="file holding the secret key (trailing newline ignored)")
    region: str = "us-east-1"
    presign: bool = Field(True, description="appliances upload frames straight to the store with presigned URLs")

    def secret(self) -> str:
        """The secret key from the config or its file."""
        if self.secret_key_file is not None:
            try:
                return self.secret_key_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"storage.s3.secret_key_file: cannot read {self.secret_key_file}: "
                                  f"{exc.strerror or exc}") from None
        if self.secret_key is None:
            raise ConfigError("storage.s3: set secret_key or secret_key_file")
        return self.secret_key.get_secret_value()


class FleetStorageConfig(_Strict):
    """PostgreSQL for the catalogue and S3 for frames and bundles: many trainers and workers, many plants."""

    type: Literal["fleet"] = "fleet"
    database_url: SecretStr = Field(description="postgresql+psycopg://user:password@host:port/db")
    s3: S3Config


StorageConfig = Annotated[EmbeddedStorageConfig | FleetStorageConfig, Field(discriminator="type")]


class GateConfig(_Strict):
    """When a rebuilt model may be published: not worse than the running one by these margins."""

    auroc_margin: float = Field(0.01, ge=0, le=1, description="the candidate's image AUROC may be at most this "
                                                              "below the running model's")
    false_reject_margin: float = Field(0.02, ge=0, le=1, description="its false-reject rate at its calibrated "
                                                                     "threshold may be at most this above")
    escape_margin: float = Field(0.0, ge=0, le=1, description="its escape rate may be at most this above")
    min_eval_good: int = Field(10, ge=1, description="held-out good frames needed to evaluate at all")
    min_eval_defect: int = Field(1, ge=0, description="labelled defect frames needed for AUROC and escapes "
                                                      "(below it those are not compared, and the report says so)")


class JobsConfig(_Strict):
    """Rebuild jobs."""

    max_attempts: int = Field(3, ge=1, description="a failing job is retried up to this many times in all")
    retry_delay_s: float = Field(60.0, ge=0, description="wait before a retry")
    scheduler_s: float = Field(30.0, gt=0, description="how often cron schedules are looked at")


class RebuildConfig(_Strict):
    """How a rebuild fits (a camera's own settings override these)."""

    scorer: str = "patchcore"
    size: str | None = Field(None, description="working size, e.g. '256' or '256x624' (None: fit's default)")
    settings: dict[str, Any] = Field(default_factory=dict, description="scorer settings (fit --set)")
    threads: int | None = Field(None, ge=1)


class TrainerConfig(_Strict):
    """The whole trainer.toml."""

    host: str = Field("127.0.0.1", description="address the API and page listen on")
    port: int = Field(8090, ge=0, le=65535)
    storage: StorageConfig = Field(default_factory=EmbeddedStorageConfig)
    admin_tokens: dict[str, SecretStr] = Field(default_factory=dict, description="name -> token of the people and "
                                                                                 "tools that run the trainer")
    gate: GateConfig = Field(default_factory=GateConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    rebuild: RebuildConfig = Field(default_factory=RebuildConfig)
    work_dir: Path = Field(Path("/var/cache/anomaly-trainer"), description="scratch space of rebuilds")


def parse_trainer_config(data: dict, origin: str = "<trainer config>") -> TrainerConfig:
    """Validate a parsed TOML document; ``ConfigError`` lists every problem as ``origin: key: reason``."""
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{origin}: {'.'.join(str(x) for x in err['loc']) or '(top level)'}: "
                 f"{err['msg'].removeprefix('Value error, ')}" for err in exc.errors()]
        raise ConfigError("invalid trainer configuration:\n  " + "\n  ".join(lines)) from None


def load_trainer_config(path: str | Path) -> TrainerConfig:
    """Read and validate a trainer.toml."""
    path = Path(path)
    try:
        return parse_trainer_config(tomllib.loads(path.read_text()), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such trainer config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
