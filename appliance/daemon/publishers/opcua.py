"""OPC UA server for PLCs and SCADA: per camera an object with result and status variables and a Trigger method.

An asyncua server on the daemon's asyncio loop. Each camera of ``cameras`` is an object under
``Objects/Cameras`` whose variables (read-only to clients) hold the last result and the camera's
state; its ``Trigger(id)`` method asks the daemon for one frame, exactly as the control socket's
``trigger`` does. Anonymous sessions are refused unless ``allow_anonymous``; users log in with a
name and password (stored as ``sha256:<hex>``, or plain text); the endpoint offers the security
policies configured (Basic256Sha256 needs the server's certificate and key). See docs/opcua.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hashlib
import hmac
import logging
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from asyncua import Server, ua
from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole
from asyncua.server.user_managers import UserManager
from pydantic import Field, field_validator, model_validator

from ...errors import ApplianceError, PublishError
from ..commands import parse_command
from ..records import Inspection
from .base import Delivery, OutputContext, Publisher, PublisherConfig, register_publisher, run_on_loop

log = logging.getLogger(__name__)

Policy = Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]
_POLICIES = {"None": ua.SecurityPolicyType.NoSecurity,
             "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
             "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}
_VERDICT_CODES = {"ok": 1, "ng": 2, "error": 3}
#: Variable name -> OPC UA type and initial value; every camera object has all of them.
VARIABLES: dict[str, tuple[ua.VariantType, Any]] = {
    "Ready": (ua.VariantType.Boolean, False), "Enabled": (ua.VariantType.Boolean, False),
    "ModelLoaded": (ua.VariantType.Boolean, False), "ModelId": (ua.VariantType.String, ""),
    "Threshold": (ua.VariantType.Double, 0.0), "Error": (ua.VariantType.Boolean, False),
    "ErrorText": (ua.VariantType.String, ""), "InspectionId": (ua.VariantType.String, ""),
    "ResultSeq": (ua.VariantType.UInt32, 0), "TriggerId": (ua.VariantType.String, ""),
    "Verdict": (ua.VariantType.String, ""), "VerdictCode": (ua.VariantType.UInt16, 0),
    "Score": (ua.VariantType.Double, 0.0), "RawScore": (ua.VariantType.Double, 0.0),
    "ProcessingMs": (ua.VariantType.Double, 0.0),
    "CapturedAt": (ua.VariantType.DateTime, dt.datetime(1970, 1, 1, tzinfo=dt.UTC)),
    "FinishedAt": (ua.VariantType.DateTime, dt.datetime(1970, 1, 1, tzinfo=dt.UTC)),
    "ResultCount": (ua.VariantType.UInt32, 0), "Alarms": (ua.VariantType.String, ""),
    "Drift": (ua.VariantType.Boolean, False), "DriftState": (ua.VariantType.String, ""),
}


class OpcUaConfig(PublisherConfig):
    """The OPC UA server: endpoint, cameras, who may log in, with which security."""

    type: Literal["opcua"] = "opcua"
    endpoint: str = Field("opc.tcp://127.0.0.1:4840/appliance/", description="opc.tcp:// URL to listen on "
                                                                             "(port 0: any free port, for tests)")
    namespace: str = Field("urn:anomaly-appliance", min_length=1, description="namespace URI of the nodes")
    cameras: list[str] = Field(min_length=1, description="camera ids published as objects")
    allow_anonymous: bool = Field(False, description="accept sessions without a user name")
    users: dict[str, str] = Field(default_factory=dict, description="user name -> password, as 'sha256:<hex>' "
                                                                    "(recommended) or plain text")
    security: list[Policy] = Field(["None"], min_length=1, description="security policies offered: None, "
                                                                       "Basic256Sha256_Sign, "
                                                                       "Basic256Sha256_SignAndEncrypt")
    certificate: Path | None = Field(None, description="server certificate (DER or PEM); needed by Basic256Sha256")
    private_key: Path | None = Field(None, description="the certificate's private key (PEM)")
    refresh_s: float = Field(0.5, gt=0, le=10, description="how often Ready/Enabled/ModelId follow the daemon")
    timeout: float = Field(15.0, gt=0, description="seconds to wait for the server to start or stop")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        url = urlparse(value)
        if url.scheme != "opc.tcp" or not url.hostname:
            raise ValueError(f"{value!r} is not an opc.tcp://host:port/path URL")
        return value

    @model_validator(mode="after")
    def _security(self) -> OpcUaConfig:
        if any(p != "None" for p in self.security) and (self.certificate is None or self.private_key is None):
            raise ValueError("Basic256Sha256 policies need certificate and private_key")
        if not self.allow_anonymous and not self.users:
            raise ValueError("no one could log in: set allow_anonymous = true or add users")
        return self


class _Users(UserManager):
    """Anonymous only if allowed; named users by password (constant-time comparison)."""

    def __init__(self, config: OpcUaConfig) -> None:
        self.config = config
        self.refused = 0

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is None:  # X509 user tokens are not offered: no name means anonymous
            if self.config.allow_anonymous:
                return User(role=UserRole.User)
        elif username is not None and password is not None and username in self.config.users:
            stored = self.config.users[username]
            if stored.startswith("sha256:"):
                given = "sha256:" + hashlib.sha256(str(password).encode()).hexdigest()
            else:
                given = str(password)
            if hmac.compare_digest(given.encode(), stored.encode()):
                return User(role=UserRole.User, name=username)
        self.refused += 1
        log.warning("opcua: session refused for %s", username or "an anonymous client")
        return None


@register_publisher
class OpcUaPublisher(Publisher):
    """Results and camera state as OPC UA variables; ``Trigger`` methods (see docs/opcua.md)."""

    type = "opcua"
    Config = OpcUaConfig

    def __init__(self, config: OpcUaConfig, context: OutputContext) -> None:
        super().__init__(config, context)
        self.config: OpcUaConfig = config
        self._users = _Users(config)
        self._server: Server | None = None
        self._nodes: dict[str, dict[str, Any]] = {}
        self._counts = dict.fromkeys(config.cameras, 0)
        self._task: asyncio.Task | None = None
        self._port: int | None = None
        self._closing = False

    @property
    def endpoint(self) -> str | None:
        """The URL clients connect to (the real port with ``:0``), ``None`` until started."""
        if self._port is None:
            return None
        url = urlparse(self.config.endpoint)
        return f"opc.tcp://{url.hostname}:{self._port}{url.path}"

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Serve on the daemon's loop; ``PublishError`` if the endpoint or the certificate is unusable."""
        run_on_loop(self.context.loop, self.start_async(), self.config.timeout, self.type, "start")

    async def start_async(self) -> None:
        """Build the address space and listen (on the running loop)."""
        cfg = self.config
        url = urlparse(cfg.endpoint)
        port = url.port if url.port is not None else 4840
        if port == 0:  # asyncua needs a number: take a free one (tests)
            with socket.socket() as probe:
                probe.bind((url.hostname, 0))
                port = probe.getsockname()[1]
        server = Server(user_manager=self._users)
        await server.init()
        server.set_endpoint(f"opc.tcp://{url.hostname}:{port}{url.path}")
        server.set_server_name("anomaly-appliance")
        server.set_security_policy([_POLICIES[p] for p in cfg.security], permission_ruleset=SimpleRoleRuleset())
        tokens = [ua.UserNameIdentityToken] + ([ua.AnonymousIdentityToken] if cfg.allow_anonymous else [])
        server.set_identity_tokens(tokens)
        try:
            if cfg.certificate is not None and cfg.private_key is not None:
                await server.load_certificate(str(cfg.certificate))
                await server.load_private_key(str(cfg.private_key))
            idx = await server.register_namespace(cfg.namespace)
            folder = await server.nodes.objects.add_folder(idx, "Cameras")
            for cam in cfg.cameras:
                obj = await folder.add_object(idx, cam)
                nodes = {name: await obj.add_variable(idx, name, ua.Variant(value, vtype))
                         for name, (vtype, value) in VARIABLES.items()}
                nodes["Trigger"] = await obj.add_method(idx, "Trigger", self._trigger_method(cam),
                                                        [ua.VariantType.String], [ua.VariantType.Boolean])
                nodes["Label"] = await obj.add_method(idx, "Label", self._label_method(cam),
                                                      [ua.VariantType.String, ua.VariantType.String,
                                                       ua.VariantType.String], [ua.VariantType.String])
                self._nodes[cam] = nodes
            await server.start()
        except (OSError, ValueError) as exc:
            raise PublishError(f"opcua output cannot serve {cfg.endpoint}: {exc}") from exc
        self._server = server
        self._port = port
        self._task = asyncio.create_task(self._refresh_forever(), name="opcua-refresh")
        log.info("opcua output serving %s", self.endpoint)

    def close(self) -> None:
        """Ready drops, then the server stops; never raises."""
        self._closing = True
        if self._server is None:
            return
        try:
            run_on_loop(self.context.loop, self.stop_async(), self.config.timeout, self.type, "stop")
        except Exception as exc:
            log.warning("opcua output did not stop cleanly: %s", exc)

    async def stop_async(self) -> None:
        """Stop refreshing, drop Ready, stop the server (on the running loop)."""
        if self._task is not None:
            self._task.cancel()
        server, self._server = self._server, None
        if server is None:
            return
        for nodes in self._nodes.values():
            await nodes["Ready"].write_value(False)
        await server.stop()

    # ------------------------------------------------------------ results (worker thread)
    def publish(self, inspection: Inspection) -> Delivery:
        """Write the record into its camera's variables (on the loop)."""
        if inspection.camera not in self._nodes:
            return Delivery("skipped", detail=f"camera {inspection.camera} is not published over OPC UA")
        loop = self.context.loop
        if loop is None or loop.is_closed() or self._server is None:
            raise PublishError("opcua output is not serving")
        future = asyncio.run_coroutine_threadsafe(self._write_result(inspection), loop)
        try:
            future.result(self.config.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PublishError("opcua output: the daemon's loop did not take the result in time") from None
        return Delivery("sent", detail=f"{self.endpoint} {inspection.camera}")

    async def _write_result(self, r: Inspection) -> None:
        self._counts[r.camera] += 1
        values = {
            "InspectionId": r.id, "ResultSeq": r.seq, "TriggerId": r.trigger_id or "", "Verdict": r.verdict,
            "VerdictCode": _VERDICT_CODES[r.verdict], "Score": float(r.score or 0.0),
            "RawScore": float(r.raw_score or 0.0), "ProcessingMs": float(r.latency_ms.get("total", 0.0)),
            "CapturedAt": dt.datetime.fromtimestamp(r.captured_at, dt.UTC),
            "FinishedAt": dt.datetime.fromtimestamp(r.finished_at, dt.UTC),
            "Error": r.verdict == "error", "ErrorText": r.error or "", "ResultCount": self._counts[r.camera],
        }
        await self._write(r.camera, values)

    async def _write(self, camera: str, values: dict[str, Any]) -> None:
        nodes = self._nodes[camera]
        for name, value in values.items():
            await nodes[name].write_value(ua.Variant(value, VARIABLES[name][0]))

    # ------------------------------------------------------------ trigger, health (loop thread)
    def _trigger_method(self, camera: str) -> Any:
        async def trigger(parent: ua.NodeId, trigger_id: ua.Variant | str) -> list[ua.Variant] | ua.StatusCode:
            tid = trigger_id.Value if isinstance(trigger_id, ua.Variant) else trigger_id
            try:
                if self.context.trigger is None:
                    raise PublishError("the daemon gave this output no trigger")
                accepted = bool(self.context.trigger(camera, str(tid) if tid else None))
            except ApplianceError as exc:
                log.warning("opcua: trigger for %s refused: %s", camera, exc)
                return ua.StatusCode(ua.StatusCodes.BadInvalidState)  # free-running or disabled camera
            return [ua.Variant(accepted, ua.VariantType.Boolean)]

        return trigger

    def _label_method(self, camera: str) -> Any:
        async def label(parent: ua.NodeId, inspection: Any, verdict: Any, note: Any
                        ) -> list[ua.Variant] | ua.StatusCode:
            """Label(InspectionId, "good"|"defect", Note) -> the label's id (empty Note: none)."""
            values = [v.Value if isinstance(v, ua.Variant) else v for v in (inspection, verdict, note)]
            try:
                if self.context.control is None:
                    raise PublishError("the daemon gave this output no control handler")
                command = parse_command({"cmd": "label", "inspection": values[0], "label": values[1],
                                         "note": values[2] or None, "camera": camera, "who": "opcua"})
                result = await self.context.control(command)
            except ApplianceError as exc:
                log.warning("opcua: label for %s refused: %s", camera, exc)
                return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
            return [ua.Variant(result["label_id"], ua.VariantType.String)]

        return label

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("opcua: refreshing the camera state failed")
            await asyncio.sleep(self.config.refresh_s)

    async def refresh(self) -> None:
        """Ready, Enabled, ModelLoaded, ModelId, Threshold and Alarms from the daemon's status (per camera)."""
        try:
            status = self.context.status()
            cameras, alarms = status.cameras, [a.kind for a in status.daemon.alarms]
        except Exception as exc:
            log.warning("opcua: the daemon's status failed: %s", exc)
            cameras, alarms = {}, []
        for cam in self._nodes:
            s = cameras.get(cam)
            model_id = (s.bundle.model_id or "") if s is not None else ""
            await self._write(cam, {"Ready": s is not None and s.ready and not self._closing,
                                    "Enabled": s is not None and s.enabled, "ModelLoaded": bool(model_id),
                                    "ModelId": model_id, "Threshold": float(s.threshold.value) if s else 0.0,
                                    "Alarms": ", ".join(alarms),
                                    "Drift": s is not None and s.drift.get("state") == "drift",
                                    "DriftState": s.drift.get("state", "off") if s is not None else ""})

    # ------------------------------------------------------------ status, doctor
    def state(self) -> dict[str, Any]:
        """Endpoint, sessions refused, results written per camera."""
        return {"listening": self._server is not None, "endpoint": self.endpoint, "refused_sessions":
                self._users.refused, "results": dict(self._counts)}

    @classmethod
    def check(cls, config: PublisherConfig, state_dir: Path) -> tuple[str, str]:
        """The endpoint's port can be bound (or answers), certificate files readable, login possible."""
        assert isinstance(config, OpcUaConfig)
        for path in (config.certificate, config.private_key):
            if path is not None and not path.is_file():
                return "fail", f"{path} does not exist (certificate/private_key)"
        url = urlparse(config.endpoint)
        host, port = url.hostname or "127.0.0.1", url.port or 4840
        note = "; anonymous sessions allowed" if config.allow_anonymous else ""
        plain = [u for u, p in config.users.items() if not p.startswith("sha256:")]
        if plain:
            note += f"; plain-text passwords for {plain} (store 'sha256:<hex>')"
        if "None" in config.security and config.users:
            note += "; passwords travel unencrypted with security None"
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as exc:
            try:
                socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), 2).close()
                return "ok", f"something (the running appliance?) listens on {host}:{port}{note}"
            except OSError:
                return "fail", f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        return ("warn" if note else "ok"), f"{config.endpoint} can be served{note}"
