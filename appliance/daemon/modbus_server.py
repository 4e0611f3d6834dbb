"""The Modbus TCP server under the Modbus output: pymodbus, restricted to what the register map documents.

pymodbus does the framing and the transport. Its stock decoder knows every public function code
(diagnostics, device identification, file records, ...) and answers them; this server decodes
only 3, 4, 6, 16 and 23 with pymodbus' own request classes, and answers any other function code
with exception 1 (``fc | 0x80``), and a request of a known code whose fields do not decode
(a count above what Modbus allows, a short body) with exception 3. Both are counted, never
logged per frame: a fuzzing or misconfigured client must not fill the journal.

The registers live in ``RegisterStore``, which pymodbus calls for every read and write; every
change happens under its one lock, so a multi-register read never mixes two results.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
import threading
from collections.abc import Callable
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import SimData, SimDevice

from .modbus_map import CameraMap, Exc

log = logging.getLogger(__name__)

#: The function codes the register map answers (docs/modbus-register-map.md); any other gets exception 1.
FUNCTION_CODES = (3, 4, 6, 16, 23)
#: Largest MBAP length field: unit id + a PDU of at most 253 bytes.
_MAX_MBAP_LENGTH = 254


def quiet_pymodbus() -> None:
    """Keep pymodbus to ERROR and above unless someone chose its level (the daemon's logging does the same).

    At WARNING pymodbus writes a line per frame it cannot use; the server counts those instead.
    """
    logger = logging.getLogger("pymodbus")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


class RegisterStore:
    """All cameras' maps behind one lock; pymodbus calls it as its datastore (``async_getValues`` ...).

    ``on_actions(unit, actions)`` carries out the triggers and commands a write asks for, and
    ``on_trigger_id(unit, trigger_id)`` hears of every TriggerID a rising Trigger takes (accepted
    or not); both run on the loop before the write is answered.
    """

    def __init__(self, units: dict[int, CameraMap]) -> None:
        self.units = units
        self.lock = threading.Lock()
        self.on_actions: Callable[[int, list[Any]], None] | None = None
        self.on_trigger_id: Callable[[int, int], None] | None = None

    def device_ids(self) -> list[int]:
        """Configured unit ids."""
        return list(self.units)

    async def async_getValues(self, device_id: int, func_code: int, address: int,  # noqa: N802 - pymodbus' API
                              count: int = 1) -> list[int] | ExcCodes:
        """A read: one consistent snapshot of the registers asked for."""
        cam = self.units.get(device_id)
        if cam is None:
            return ExcCodes.GATEWAY_NO_RESPONSE
        with self.lock:
            values = cam.read(func_code, address, count)
        return ExcCodes(int(values)) if isinstance(values, Exc) else values

    async def async_setValues(self, device_id: int, func_code: int, address: int,  # noqa: N802 - pymodbus' API
                              values: list[int]) -> ExcCodes | None:
        """A write; the triggers and commands it asks for are carried out before the answer goes out."""
        cam = self.units.get(device_id)
        if cam is None:
            return ExcCodes.GATEWAY_NO_RESPONSE
        with self.lock:
            before = cam.next_trigger_id
            actions = cam.write(func_code, address, [int(v) for v in values])
            trigger_id = cam.next_trigger_id
        if isinstance(actions, Exc):
            return ExcCodes(int(actions))
        if trigger_id != before and self.on_trigger_id is not None:
            self.on_trigger_id(device_id, trigger_id)
        if actions and self.on_actions is not None:
            self.on_actions(device_id, actions)
        return None


class Counters:
    """What the server saw: ``state()`` of the Modbus output shows them."""

    def __init__(self) -> None:
        self.requests = self.refused_clients = self.malformed = self.refused_functions = self.connections = 0


class _Refused(ModbusPDU):
    """A request the map does not serve; its "update" is the exception answer, the datastore is not asked."""

    def __init__(self, function_code: int, exception: ExcCodes) -> None:
        super().__init__()
        self.function_code = function_code
        self.exception = exception

    async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
        """Exception ``exception`` for ``function_code`` (pymodbus adds transaction and unit id)."""
        return ExceptionResponse(self.function_code, self.exception)


class MapDecoder(DecodePDU):
    """pymodbus' request decoder with only the register map's function codes; it never fails a frame.

    Any other code decodes to an exception-1 answer, a known code whose fields do not decode to an
    exception-3 answer (Modbus' "illegal data value"), each counted.
    """

    def __init__(self, counters: Counters) -> None:
        super().__init__(True)
        self.pdu_table = {fc: DecodePDU.pdu_table[fc] for fc in FUNCTION_CODES}
        self.pdu_sub_table: dict[int, dict[int, tuple[type[ModbusPDU], type[ModbusPDU]]]] = {}
        self.counters = counters

    def decode(self, frame: bytes) -> ModbusPDU | None:
        """The request in ``frame`` (function code first), or the exception that answers it."""
        function_code = frame[0]
        if function_code not in self.pdu_table:
            self.counters.refused_functions += 1
            return _Refused(function_code, ExcCodes.ILLEGAL_FUNCTION)
        pdu = self.pdu_table[function_code][0]()
        try:
            pdu.decode(frame[1:])
        except (ModbusException, ValueError, IndexError, struct.error):
            self.counters.malformed += 1
            return _Refused(function_code, ExcCodes.ILLEGAL_VALUE)
        return pdu


def mbap_problem(data: bytes) -> str | None:
    """What is wrong with the MBAP header at the start of ``data`` (as far as it has arrived), or ``None``."""
    if len(data) >= 4 and data[2:4] != b"\x00\x00":
        return "protocol id is not 0"
    if len(data) >= 6 and not 2 <= int.from_bytes(data[4:6], "big") <= _MAX_MBAP_LENGTH:
        return "length out of range"
    if len(data) >= 8 and (data[7] == 0 or data[7] >= 0x80):
        return "function code out of range"
    return None


class _Handler(ServerRequestHandler):
    """One client connection: the allow-list on connect, broken headers close the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        owner: ModbusServer = self.server
        peer = transport.get_extra_info("peername")
        if not owner.allowed(peer[0] if peer else None):
            owner.counters.refused_clients += 1
            log.warning("modbus: client %s is not in allow; disconnected", peer)
            self.close()
            return
        owner.counters.connections += 1

    def callback_data(self, data: bytes, addr: tuple | None = None) -> int:
        owner: ModbusServer = self.server
        problem = mbap_problem(data)
        if problem is not None:
            owner.counters.malformed += 1
            log.debug("modbus: malformed frame (%s); closing the connection", problem)
            self.close()
            return len(data)
        used = super().callback_data(data, addr)
        if self.last_pdu is not None and not isinstance(self.last_pdu, _Refused):
            owner.counters.requests += 1
        return used

    def server_send(self, pdu: ModbusPDU | None, addr: tuple | None) -> None:
        """Send an answer; a client that left before it is gone silently (pymodbus would log an error)."""
        if self.transport is not None:
            super().server_send(pdu, addr)


class ModbusServer(ModbusTcpServer):
    """pymodbus' TCP server on ``store``, with the map's decoder, the allow-list and counters."""

    def __init__(self, store: RegisterStore, host: str, port: int, allow: list[str]) -> None:
        quiet_pymodbus()
        placeholder = SimDevice(0, simdata=[SimData(0)])  # pymodbus wants one; the store replaces it
        super().__init__(placeholder, address=(host, port))
        self.context = store
        self.counters = Counters()
        self.decoder = MapDecoder(self.counters)
        self._allow = [ipaddress.ip_network(a, strict=False) for a in allow]

    def allowed(self, address: str | None) -> bool:
        """Whether a client at ``address`` is in ``allow`` (an IPv4-mapped IPv6 address counts as IPv4)."""
        if address is None:
            return False
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._allow)

    def callback_new_connection(self) -> _Handler:
        """Each connection gets this server's handler (the allow-list, broken headers, counters)."""
        return _Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)
