"""What native image decoders print, caught per call and turned into log records that name the file.

libjpeg and libpng (inside OpenCV) print their warnings with ``fprintf(stderr, ...)``, straight to
file descriptor 2, and OpenCV's own log (libtiff's warnings) goes there too;
``cv2.utils.logging.setLogLevel`` silences only the latter. On a daemon that is a stream of lines
such as ``Corrupt JPEG data: 12 extraneous bytes before marker 0xd9`` with no file, camera or
inspection attached. ``captured()`` points fd 2 at a private file for the duration of one decode,
so what the decoder says can be attached to the file being decoded.

Redirecting fd 2 is process-wide, so captures are serialised by a lock (one decode at a time in a
process, which at a few milliseconds a frame costs nothing on an edge box), and lines that are not
decoder messages (another thread's output written meanwhile) are passed on to the real stderr.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Lines written by the decoders: libjpeg's messages, libpng's, and OpenCV's log (which carries libtiff's).
DECODER_LINE = re.compile(
    r"^(Corrupt JPEG data|Premature end of JPEG file|Invalid JPEG file structure|Invalid SOS parameters"
    r"|Inconsistent progression sequence|Unknown Adobe color transform|Warning: unknown JFIF revision"
    r"|Application transferred too many scanlines|Unsupported marker type|libpng (warning|error)"
    r"|\[ ?(WARN|ERROR|INFO):)"
)
#: libjpeg warnings after which pixels are missing or garbled: the frame is an error, not a warning.
DAMAGED = re.compile(r"premature end|bad Huffman code|bad arithmetic code|instead of RST", re.IGNORECASE)

_lock = threading.Lock()
_sink: int | None = None  # an unlinked temporary file that fd 2 points at during a capture


def _sink_fd() -> int:
    global _sink  # one sink per process, opened on first use
    if _sink is None:
        fd, name = tempfile.mkstemp(prefix="appliance-decoder-")
        os.unlink(name)
        _sink = fd
    return _sink


@contextmanager
def captured() -> Iterator[list[str]]:
    """Collect the decoder lines native code writes to fd 2 inside the block; others go on to stderr.

    The list is filled when the block ends. Without a usable fd 2 (closed) the block runs uncaptured.
    """
    lines: list[str] = []
    with _lock:
        try:
            sink, saved = _sink_fd(), os.dup(2)
        except OSError:  # no fd 2, or no temporary folder: decode without catching
            sink = saved = None
        if saved is None:
            yield lines
            return
        try:
            os.dup2(sink, 2)
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            size = os.lseek(sink, 0, os.SEEK_CUR)
            text = os.pread(sink, size, 0).decode("utf-8", "replace") if size else ""
            if size:
                os.ftruncate(sink, 0)
                os.lseek(sink, 0, os.SEEK_SET)
            other = []
            for line in text.splitlines():
                (lines if DECODER_LINE.match(line) else other).append(line)
            if other:
                sys.stderr.write("\n".join(other) + "\n")


class RateLimitedLog:
    """At most ``burst`` records per ``window_s`` seconds; the rest are counted and the count reported later.

    A camera sending thousands of slightly corrupt frames must not flood the journal, and must not
    go quiet either: the next record let through says how many were held back.
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, window_s: float = 60.0) -> None:
        self.logger = logger
        self.burst = burst
        self.window_s = window_s
        self._lock = threading.Lock()
        self._start = -float("inf")
        self._sent = 0
        self._held = 0

    def log(self, level: int, message: str, *args: object) -> bool:
        """Log ``message % args`` at ``level`` unless the budget is spent; ``True`` when it was logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._start >= self.window_s:
                self._start, self._sent = now, 0
            if self._sent >= self.burst:
                self._held += 1
                return False
            self._sent += 1
            held, self._held = self._held, 0
        if held:
            message += " (%d similar messages held back before this one)"
            args = (*args, held)
        self.logger.log(level, message, *args)
        return True
