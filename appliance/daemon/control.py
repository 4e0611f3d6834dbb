"""The local control socket: one JSON request per line, one JSON answer per line.

Who may connect is decided by the socket's file mode and group (``[control]`` in the config):
no network exposure, no password to leak. A request is one of the typed commands of
``commands.py`` as a JSON object (``{"cmd": "threshold", "camera": "line1", "value": 0.6}``);
it is parsed and dispatched by the daemon's one dispatcher. Every command that changes
something is audited by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import ApplianceError, ConfigError
from .commands import CommandError, load_json

log = logging.getLogger(__name__)

#: ``handler(request) -> result`` (``Dispatcher.run``); raise ``ApplianceError`` for a refused request.
Handler = Callable[[Any], Awaitable[Any]]
_MAX_REQUEST = 64 * 1024


class ControlServer:
    """An asyncio Unix-socket server on the daemon's loop."""

    def __init__(self, path: Path, handler: Handler, mode: str = "0660", group: str | None = None) -> None:
        self.path = Path(path)
        self._handler = handler
        self._mode = int(mode, 8)
        self._group = group
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Create the socket (replacing a stale one), then set its mode and group."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise ConfigError(f"{self.path}: another daemon is already listening here; stop it first")
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=_MAX_REQUEST)
        os.chmod(self.path, self._mode)
        if self._group:
            try:
                os.chown(self.path, -1, grp.getgrnam(self._group).gr_gid)
            except (KeyError, PermissionError) as exc:
                raise ConfigError(f"control.group {self._group!r}: cannot give the socket to it ({exc})") from None

    async def stop(self) -> None:
        """Stop listening and remove the socket file."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write((json.dumps(await self._answer(line), default=str) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a client that went away or sent an over-long line
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = load_json(line.strip(), _MAX_REQUEST)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise CommandError("a request is a JSON object with a 'cmd' string")
        except (CommandError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        try:
            return {"ok": True, "result": await self._handler(request)}
        except ApplianceError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in one command must not take the socket down
            log.exception("control command %r failed", request.get("cmd"))
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def request(path: str | Path, payload: dict[str, Any], timeout: float = 30.0) -> Any:
    """Send one request to a running daemon and return its result.

    Raises:
        ApplianceError: the daemon is not running, refused the request, or did not answer in time.

    """
    path = Path(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ApplianceError(f"{path}: no control socket; is the daemon running? "
                                 "(systemctl status anomaly-appliance)") from None
        except PermissionError:
            raise ApplianceError(f"{path}: permission denied; run as root or as a member of the socket's group") \
                from None
        except OSError as exc:
            raise ApplianceError(f"{path}: cannot connect ({exc.strerror or exc}); is the daemon running?") from None
        sock.sendall((json.dumps(payload) + "\n").encode())
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ApplianceError(f"{path}: the daemon did not answer within {timeout:g} s") from None
    if not data:
        raise ApplianceError(f"{path}: the daemon closed the connection without an answer")
    answer = json.loads(data)
    if not answer.get("ok"):
        raise ApplianceError(answer.get("error", "request refused"))
    return answer.get("result")
