"""Reliability scenarios about hostile inputs: a hot folder full of broken files, fuzzed MQTT commands and Modbus.

hotfolder: every file dropped gets an audit row and ends in done/ or failed/; a hot folder waits
(backpressure), so nothing is dropped. fuzz: every MQTT command payload gets exactly one reply,
every refusal an audit event; malformed Modbus frames are answered or closed, unsupported function
codes get exception 1, and a real PLC client still reads the registers afterwards.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pymodbus.client import ModbusTcpClient
from rel_kit import (
    PREFIX,
    Bench,
    Daemon,
    audit,
    audit_count,
    counts_line,
    events,
    free_port,
    http_get,
    mqtt_output,
    replay_camera,
    rss_mb,
    wait_for,
    write_config,
)
from rel_mqtt import Broker, Subscriber

SERVED_FCS = (3, 4, 6, 16, 23)  # docs/modbus-register-map.md


# --------------------------------------------------------------------------- hot folder


def huge_png(path: Path, side: int = 20000) -> Path:
    """A ``side`` x ``side`` RGB PNG of black pixels, written row by row (never held in memory); cached."""
    if path.exists():
        return path

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(6)
    row = b"\x00" * (1 + 3 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    tmp = path.with_suffix(".part")
    tmp.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    tmp.rename(path)
    return path


def broken_files(bench: Bench, n: int, rng: random.Random) -> Iterator[tuple[str, str, bytes]]:
    """``(kind, file name, bytes)``: valid JPEGs, truncated, bit-flipped, empty, random .png, grey, 16-bit, text."""
    images = sorted(p for p in (bench.data / "test").rglob("*.jpg"))
    special = 3
    kinds = ["valid"] * 4 + ["truncated", "bitflip", "zero", "random_png"]
    for i in range(n - special):
        kind = kinds[i % len(kinds)]
        data = rng.choice(images).read_bytes()
        if kind == "truncated":
            data = data[: rng.randint(20, len(data) // 2)]
        elif kind == "bitflip":
            buf = bytearray(data)
            for _ in range(rng.randint(1, 40)):
                pos = rng.randrange(600, len(buf))
                buf[pos] ^= 1 << rng.randrange(8)
            data = bytes(buf)
        elif kind == "zero":
            data = b""
        elif kind == "random_png":
            data = rng.randbytes(rng.randint(1, 50_000))
        yield kind, f"{i:04d}_{kind}.{'png' if kind == 'random_png' else 'jpg'}", data
    pixels = cv2.imread(str(images[0]), cv2.IMREAD_COLOR)
    yield "grey", f"{n - 3:04d}_grey.png", cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY))[1].tobytes()
    yield "png16", f"{n - 2:04d}_png16.png", cv2.imencode(".png", pixels.astype(np.uint16) * 257)[1].tobytes()
    yield "text", f"{n - 1:04d}_text.txt", b"not an image\n" * 10


def _drop(files: list[tuple[str, str, bytes]], staging: Path, inbox: Path) -> None:
    """Write every file beside the inbox, then rename them all in at once (complete files appear together)."""
    staging.mkdir(exist_ok=True)
    for _, name, data in files:
        (staging / name).write_bytes(data)
    for _, name, _ in files:
        (staging / name).rename(inbox / name)


def _in_inbox(inbox: Path) -> list[str]:
    return sorted(p.name for p in inbox.iterdir() if p.is_file())


def hotfolder(bench: Bench, n_files: int, seed: int) -> dict[str, Any]:
    """``n_files`` files at once into a folder source with queue 2, then one 20000x20000 PNG; see the module."""
    root = bench.fresh("hotfolder")
    inbox = root / "inbox"
    inbox.mkdir()
    camera = {"id": "cam1", "bundle": str(bench.bundle), "queue": 2, "source": {"type": "folder", "path": str(inbox)}}
    daemon = Daemon(write_config(root, [camera], [{"type": "http", "port": free_port()}], bench.cache))
    huge = huge_png(bench.out / "huge_20000x20000.png")
    files = list(broken_files(bench, n_files - 1, random.Random(seed)))
    db = daemon.db

    def settled(count: int) -> bool:
        rows = audit_count(db, "SELECT count(*) FROM inspections")
        return not _in_inbox(inbox) and rows >= count

    try:
        daemon.start()
        hwm_start = rss_mb(daemon.pid)[1]
        t0 = time.monotonic()
        _drop(files, root / "staging", inbox)
        with_timeout = 120 + 2.0 * len(files)
        try:
            wait_for(lambda: settled(len(files)), with_timeout, "every file inspected", every=0.5,
                     alive=daemon.check_alive)
        except TimeoutError as exc:
            note = str(exc)
        else:
            note = None
        batch_s = time.monotonic() - t0
        hwm_before = rss_mb(daemon.pid)[1]
        shutil.copy(huge, root / "staging" / "huge_20000x20000.png")
        (root / "staging" / "huge_20000x20000.png").rename(inbox / "huge_20000x20000.png")
        files.append(("huge", "huge_20000x20000.png", b""))
        try:
            wait_for(lambda: settled(len(files)), 300, "the huge file inspected", every=0.5, alive=daemon.check_alive)
        except TimeoutError as exc:
            note = (note or "") + str(exc)
        hwm_after = rss_mb(daemon.pid)[1]
        stop = daemon.stop()
    finally:
        daemon.ensure_stopped()
    rows = audit(db, "SELECT source, verdict, error FROM inspections")
    by_name: dict[str, list[tuple[str, str | None]]] = {}
    for source, verdict, error in rows:
        by_name.setdefault(Path(source or "").name, []).append((verdict, error))
    names = [name for _, name, _ in files]
    lost = [name for name in names if name not in by_name]
    per_kind: dict[str, dict[str, int]] = {}
    for kind, name, _ in files:
        for verdict, _ in by_name.get(name, [("lost", None)]):
            per_kind.setdefault(kind, {}).setdefault(verdict, 0)
            per_kind[kind][verdict] += 1
    done = sorted(p.name for p in (inbox / "done").glob("*")) if (inbox / "done").exists() else []
    failed = sorted(p.name for p in (inbox / "failed").glob("*")) if (inbox / "failed").exists() else []
    huge_rows = by_name.get("huge_20000x20000.png", [])
    result = {"sent": len(files), "audited": len(rows), "delivered": len(done) + len(failed), "lost": len(lost),
              "duplicated": sum(len(v) - 1 for v in by_name.values() if len(v) > 1), "out_of_order": None,
              "crashed": daemon.crashes(), "crash_lines": daemon.crash_lines()[:10],
              "error_rows": sum(v == "error" for _, v, _ in rows), "done": len(done), "failed": len(failed),
              "left_in_inbox": _in_inbox(inbox), "frame_dropped_events": events(db, "frame_dropped"),
              "lost_files": lost[:20], "per_kind": per_kind, "batch_s": round(batch_s, 1),
              "huge_file": huge_rows, "vmhwm_mb": {"at_start": round(hwm_start, 1), "before_huge": round(hwm_before, 1),
                                                   "after_huge": round(hwm_after, 1)},
              "stop_exit": stop.returncode, "timeout": note}
    result["line"] = counts_line("hotfolder", result, (
        f"error rows {result['error_rows']}, done/ {len(done)}, failed/ {len(failed)}, still in inbox "
        f"{len(result['left_in_inbox'])}, frame_dropped {result['frame_dropped_events']}; peak RSS (VmHWM) "
        f"{hwm_before:.0f} MB before the 20000x20000 PNG, {hwm_after:.0f} MB after "
        f"({huge_rows[0][0] if huge_rows else 'no row'}); batch of {len(files) - 1} in {batch_s:.0f} s"))
    result["notes"] = [f"verdicts per kind of file: {per_kind}"] + (
        [f"lost files (first 20): {lost[:20]}"] if lost else []) + (
        [f"log: {line[:300]}" for line in result["crash_lines"][:5]]) + ([note] if note else [])
    return result


# --------------------------------------------------------------------------- fuzz: MQTT commands


COMMAND_NAMES = ("trigger", "threshold", "reload", "enable", "bundle", "x")


def command_payloads(rng: random.Random, n: int) -> Iterator[tuple[str, str, str, bytes]]:
    """``(camera, command name, kind, payload)``: junk, deep nesting, 1 MB strings, wrong types, -0.0, NaN, ..."""
    for i in range(n):
        cam = "nocam" if rng.random() < 0.03 else rng.choice(("cam1", "cam2"))
        name = rng.choice(COMMAND_NAMES)
        rid = f"f{i}"
        kind = rng.choice(("junk", "deep", "huge_string", "wrong_type", "neg_zero", "nan_text", "huge_number",
                           "valid", "valid", "unknown_field", "empty", "non_object", "bad_utf8", "dup_keys",
                           "long_id", "bad_token", "names_command"))
        if kind == "junk":
            payload = rng.randbytes(rng.randint(1, 300))
        elif kind == "deep":
            payload = rng.choice((b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
                                  b'{"id": "' + rid.encode() + b'", "value": ' + b"[" * 5000 + b"]" * 5000 + b"}"))
        elif kind == "huge_string":
            payload = json.dumps({"id": rid, rng.choice(("value", "who", "id", "slot")): "x" * 2**20}).encode()
        elif kind == "wrong_type":
            payload = json.dumps({"id": rid, **rng.choice(({"value": "high"}, {"value": [0.5]}, {"value": True},
                                                           {"enabled": "yes"}, {"enabled": 1}, {"slot": {"a": 1}},
                                                           {"shift": 5}, {"who": 7}, {"value": {"v": 1}}))}).encode()
        elif kind == "neg_zero":
            payload = json.dumps({"id": rid, "value": -0.0}).encode()
        elif kind == "nan_text":
            payload = b'{"id": "%s", "value": %s}' % (rid.encode(), rng.choice((b"NaN", b"Infinity", b"-Infinity",
                                                                               b"nan", b'"NaN"')))
        elif kind == "huge_number":
            payload = b'{"id": "%s", "value": %s}' % (rid.encode(), rng.choice((b"1e400", b"-1e400", b"9" * 5000)))
        elif kind == "valid":
            payload = json.dumps({"id": rid, **{"trigger": {}, "threshold": {"value": round(rng.random(), 3),
                                                                             "who": "fuzz"},
                                                 "reload": {}, "enable": {"enabled": rng.random() < 0.8},
                                                 "bundle": {"slot": 1}, "x": {}}[name]}).encode()
        elif kind == "unknown_field":
            payload = json.dumps({"id": rid, "value": 0.5, "bogus": rng.randint(0, 9)}).encode()
        elif kind == "empty":
            payload = rng.choice((b"", b"   ", b"\n"))
        elif kind == "non_object":
            payload = rng.choice((b"[]", b'"str"', b"42", b"null", b"true", b"-0.0", b"NaN"))
        elif kind == "bad_utf8":
            payload = b'{"id": "' + rid.encode() + b'", "who": "\xff\xfe\xc0"}'
        elif kind == "dup_keys":
            payload = b'{"id": "%s", "value": 0.1, "value": "x"}' % rid.encode()
        elif kind == "long_id":
            payload = json.dumps({"id": "y" * rng.choice((65, 10_000))}).encode()
        elif kind == "bad_token":
            payload = json.dumps({"id": rid, "token": rng.choice((5, None, "t" * 300, ["a"]))}).encode()
        else:
            payload = json.dumps({"id": rid, "cmd": "status", "camera": "cam2"}).encode()
        yield cam, name, kind, payload


def fuzz_mqtt(daemon: Daemon, broker_port: int, n: int, rng: random.Random) -> dict[str, Any]:
    """Publish ``n`` payloads one at a time, each waiting (10 s at most) for its reply on ``.../cmd/response``."""
    sub = Subscriber(broker_port, [f"{PREFIX}/+/cmd/response"], "fuzz")
    pub = Subscriber(broker_port, [f"{PREFIX}/nothing"], "fuzz-pub")
    unanswered: list[dict[str, Any]] = []
    kinds: dict[str, int] = {}
    try:
        for cam, name, kind, payload in command_payloads(rng, n):
            kinds[kind] = kinds.get(kind, 0) + 1
            before = len(sub.messages)
            pub.client.publish(f"{PREFIX}/{cam}/cmd/{name}", payload, qos=1).wait_for_publish(10)
            if not sub.wait_more(before, 10):
                unanswered.append({"camera": cam, "cmd": name, "kind": kind, "payload": payload[:120].decode(
                    errors="replace"), "bytes": len(payload)})
            if len(unanswered) >= 20:  # the daemon has stopped answering: no point waiting 10 s per payload
                break
        time.sleep(2.0)  # late replies (after their 10 s) still count
        replies = [json.loads(m.payload) for m in sub.on("/cmd/response")]
    finally:
        sub.close()
        pub.close()
    return {"sent": sum(kinds.values()), "replies": len(replies), "ok": sum(r.get("ok") is True for r in replies),
            "refused": sum(r.get("ok") is False for r in replies), "unanswered": len(unanswered),
            "unanswered_examples": unanswered[:10], "kinds": kinds,
            "refusal_reasons": sorted({(r.get("error") or "")[:80] for r in replies if r.get("ok") is False})[:40]}


# --------------------------------------------------------------------------- fuzz: Modbus


def mbap(tid: int, pdu: bytes, unit: int = 1, pid: int = 0, length: int | None = None) -> bytes:
    """A Modbus TCP frame: MBAP header (``length`` overrides the true one) and PDU."""
    return struct.pack(">HHHB", tid & 0xFFFF, pid, len(pdu) + 1 if length is None else length, unit) + pdu


def modbus_frames(rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    """``(kind, bytes)``: broken headers, truncated frames, short bodies, huge counts, random function codes."""
    for tid in range(n):
        kind = rng.choice(("random_fc", "random_fc", "bad_pid", "bad_length", "truncated", "short_body",
                           "valid_then_garbage", "exception_fc", "huge_count"))
        body = rng.randbytes(rng.randint(0, 20))
        if kind == "random_fc":
            data = mbap(tid, bytes([rng.randint(1, 0x7F)]) + body, unit=rng.choice((1, 2, 0, 255)))
        elif kind == "bad_pid":
            data = mbap(tid, b"\x03\x00\x00\x00\x01", pid=rng.randint(1, 0xFFFF))
        elif kind == "bad_length":
            data = mbap(tid, b"\x03" + body, length=rng.choice((0, 1, 255, 0xFFFF, rng.randint(256, 0xFFFF))))
        elif kind == "truncated":
            data = mbap(tid, b"\x04\x00\x00\x00\x02")[: rng.randint(1, 11)]
        elif kind == "short_body":
            data = mbap(tid, bytes([rng.choice(SERVED_FCS)]) + body[:3])
        elif kind == "valid_then_garbage":
            data = mbap(tid, b"\x04\x00\x00\x00\x02") + rng.randbytes(rng.randint(1, 30))
        elif kind == "exception_fc":
            data = mbap(tid, bytes([rng.randint(0x80, 0xFF)]) + body)
        else:
            data = mbap(tid, struct.pack(">BHH", rng.choice((3, 4)), rng.randint(0, 0xFFFF), rng.randint(0, 0xFFFF)))
        yield kind, data


def _answer(sock: socket.socket, timeout: float = 0.5) -> bytes:
    """One answer (header, then the length it gives), ``b''`` if the server closed or stayed silent."""
    sock.settimeout(timeout)
    answer = b""
    try:
        while len(answer) < 6 or len(answer) < 6 + int.from_bytes(answer[4:6], "big"):
            chunk = sock.recv(512)
            if not chunk:
                return answer
            answer += chunk
    except (TimeoutError, ConnectionError):
        return answer
    return answer


def fuzz_modbus(port: int, n: int, rng: random.Random) -> dict[str, Any]:
    """``n`` malformed frames on raw sockets, then each unsupported function code 1..127, then a real client."""
    counts = {"sent": 0, "answered": 0, "exceptions": 0, "closed_or_silent": 0, "connect_failures": 0}
    sock: socket.socket | None = None
    for kind, data in modbus_frames(rng, n):
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            sock.sendall(data)
        except OSError:
            counts["connect_failures"] += 1
            sock = None
            continue
        counts["sent"] += 1
        if kind == "truncated":  # the server waits for the rest: give up on this connection
            sock.close()
            sock = None
            continue
        reply = _answer(sock)
        if reply:
            counts["answered"] += 1
            counts["exceptions"] += len(reply) > 7 and bool(reply[7] & 0x80)
        if not reply or kind == "valid_then_garbage":
            counts["closed_or_silent"] += not reply
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    fc_ok, fc_wrong = 0, []
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        for fc in (c for c in range(1, 128) if c not in SERVED_FCS):
            s.sendall(mbap(fc, bytes([fc]) + b"\x00\x00\x00\x01"))
            reply = _answer(s, 2.0)
            if reply == mbap(fc, bytes([fc | 0x80, 1])):
                fc_ok += 1
            else:
                fc_wrong.append((fc, reply.hex()))
    plc = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    reads = {}
    try:
        plc.connect()
        for unit in (1, 2):
            regs = plc.read_input_registers(0, count=17, device_id=unit)
            reads[unit] = None if regs.isError() else regs.registers[0]
    finally:
        plc.close()
    return {**counts, "unsupported_fcs": 127 - len(SERVED_FCS), "unsupported_fc_exception_1": fc_ok,
            "unsupported_fc_wrong": fc_wrong[:10], "plc_status_after": reads,
            "plc_reads_ok": all(v is not None for v in reads.values())}


def fuzz(bench: Bench, n_commands: int, n_frames: int, seed: int) -> dict[str, Any]:
    """One daemon (cam1 externally triggered, cam2 free-running) with MQTT, Modbus and HTTP; both fuzzers."""
    root = bench.fresh("fuzz")
    broker = Broker(root / "broker")
    broker.start()
    http_port, modbus_port = free_port(), free_port()
    cameras = [replay_camera("cam1", bench.bundle, bench.replay, 10, trigger={"mode": "external"}),
               replay_camera("cam2", bench.bundle, bench.replay, 2)]
    outputs = [mqtt_output(broker.port, allow=["trigger", "threshold", "reload", "enable", "bundle"]),
               {"type": "modbus", "port": modbus_port, "cameras": {"cam1": 1, "cam2": 2}},
               {"type": "http", "port": http_port}]
    daemon = Daemon(write_config(root, cameras, outputs, bench.cache))
    rng = random.Random(seed)
    try:
        daemon.start()
        mq = fuzz_mqtt(daemon, broker.port, n_commands, rng)
        mb = fuzz_modbus(modbus_port, n_frames, rng)
        daemon.check_alive()
        for cam in ("cam1", "cam2"):  # the fuzz may have disabled them; health is judged enabled
            daemon.request({"cmd": "enable", "camera": cam, "enabled": True, "who": "reliability"})
        status = daemon.status()
        healthz = http_get(http_port, "/healthz")
        stop = daemon.stop()
    finally:
        daemon.ensure_stopped()
        broker.stop()
    refused_events = events(daemon.db, "command_refused")
    mq_status = status["outputs"]["mqtt"]
    md_status = status["outputs"]["modbus"]
    healthy = bool(status["daemon"]["healthy"] and healthz[0] == 200 and stop.returncode == 0)
    result = {"sent": mq["sent"], "audited": audit_count(daemon.db, "SELECT count(*) FROM inspections"),
              "delivered": mq["replies"], "lost": mq["unanswered"], "duplicated": max(0, mq["replies"] - mq["sent"]),
              "out_of_order": None, "crashed": daemon.crashes(), "crash_lines": daemon.crash_lines()[:10],
              "mqtt": mq, "command_refused_events": refused_events,
              "mqtt_status": {k: mq_status.get(k) for k in ("commands_ok", "commands_refused", "connected")},
              "modbus": mb, "modbus_status": {k: md_status.get(k) for k in (
                  "malformed_frames", "refused_function_codes", "listening", "refused_clients")},
              "healthz": healthz, "healthy": healthy, "stop_exit": stop.returncode}
    result["line"] = counts_line("fuzz", result, (
        f"mqtt: {mq['sent']} payloads, {mq['replies']} replies (ok {mq['ok']}, refused {mq['refused']}), "
        f"unanswered {mq['unanswered']}, command_refused events {refused_events}; modbus: {mb['sent']} frames, "
        f"answered {mb['answered']} (exceptions {mb['exceptions']}), closed/silent {mb['closed_or_silent']}, "
        f"unsupported FCs with exception 1 {mb['unsupported_fc_exception_1']}/{mb['unsupported_fcs']}, PLC reads "
        f"after {'ok' if mb['plc_reads_ok'] else 'FAILED'}; healthy {'yes' if healthy else 'NO'}"))
    result["notes"] = [f"modbus output counted malformed {md_status.get('malformed_frames')}, refused function "
                       f"codes {md_status.get('refused_function_codes')}"] + (
        [f"unanswered MQTT payloads (first 10): {mq['unanswered_examples']}"] if mq["unanswered"] else []) + (
        [f"unsupported FCs answered otherwise: {mb['unsupported_fc_wrong']}"] if mb["unsupported_fc_wrong"] else []) + (
        [f"log: {line[:300]}" for line in result["crash_lines"][:5]])
    return result
