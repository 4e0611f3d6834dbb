"""The OpenVINO patch-embedding backbone: one compiled model, a sync and an async way in.

The IR (see ``models/build_backbone.py``) takes a uint8 NHWC batch and returns the
patch embedding, so this is the only place that touches OpenVINO. The model is
reshaped to the bundle's static tile batch before compiling (static shapes are
faster), compiled with an explicit precision (f32 unless a bundle asks for bf16:
on AMX/AVX512-BF16 CPUs OpenVINO would otherwise silently pick bf16), and cached
on disk so a restart does not recompile.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from .errors import BackboneError

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16")

_core: ov.Core | None = None
_core_lock = threading.Lock()


def core() -> ov.Core:
    """The process-wide OpenVINO core (creating one is slow)."""
    global _core
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


class Backbone:
    """A compiled patch-embedding model for batches of ``T`` tiles of ``(th, tw)`` pixels.

    ``infer`` is synchronous and thread-safe. ``submit`` queues a batch on one of
    ``streams`` asynchronous requests and returns at once; ``callback(features,
    userdata)`` then runs on an OpenVINO thread (keep it short: hand the array to
    a queue). OpenVINO copies the input at submit, so the caller may reuse its buffer.
    """

    def __init__(self, xml: str | Path, batch_shape: tuple[int, int, int], *, precision: str = "f32",
                 threads: int | None = None, streams: int = 1, cache_dir: str | Path | None = None) -> None:
        if precision not in PRECISIONS:
            raise BackboneError(f"backbone precision must be one of {PRECISIONS}, got {precision!r}")
        self.xml = Path(xml)
        self.batch_shape = tuple(batch_shape)
        c = core()
        try:
            model = c.read_model(str(self.xml))
            model.reshape({0: ov.PartialShape([*self.batch_shape, 3])})
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long C++ traces
            raise BackboneError(f"{self.xml}: cannot read or reshape the backbone IR: {_first_line(exc)}") from None
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
        if streams > 1:
            config |= {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)}
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.cache_problem: str | None = None  # why the model cache could not be used (compiled without it)
        if cache_dir:
            try:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache_dir)
            except OSError as exc:
                self.cache_problem = f"cannot create the model cache {cache_dir}: {exc.strerror or exc}"
        try:
            self.compiled = c.compile_model(model, "CPU", config)
        except Exception as exc:
            if "CACHE_DIR" not in config:
                raise BackboneError(f"{self.xml}: OpenVINO cannot compile the backbone: {_first_line(exc)}") from None
            # A cache another user wrote (a technician's `sudo appliance doctor`) cannot be read or replaced:
            # compile without it, so the line runs, and say what to fix.
            self.cache_problem = (f"the OpenVINO model cache {cache_dir} cannot be used ({_first_line(exc)}); "
                                  f"compiled without it. Give the folder to the user running the appliance "
                                  f"(uid {os.getuid()}), e.g. 'chown -R anomaly-appliance: {cache_dir}', or remove it")
            del config["CACHE_DIR"]
            try:
                self.compiled = c.compile_model(model, "CPU", config)
            except Exception as exc2:
                raise BackboneError(f"{self.xml}: OpenVINO cannot compile the backbone: {_first_line(exc2)}") \
                    from None
        if self.cache_problem:
            log.warning("%s", self.cache_problem)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # "f32", "bf16"
        self.output_shape = tuple(self.compiled.outputs[0].get_shape())
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()
        self._queue: ov.AsyncInferQueue | None = None
        self._streams = streams
        self._callback: Callable[[np.ndarray, Any], None] | None = None

    def _check(self, batch: np.ndarray) -> None:
        if batch.dtype != np.uint8 or batch.shape != (*self.batch_shape, 3):
            raise BackboneError(f"backbone expects uint8 {(*self.batch_shape, 3)}, got {batch.dtype} {batch.shape}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Patch embeddings ``[T, C, h, w]`` float32 (a fresh array) for one batch."""
        self._check(batch)
        with self._lock:
            if self._request is None:
                raise BackboneError(f"{self.xml}: the backbone is closed")
            try:
                self._request.infer({0: batch}, share_inputs=True)
            except Exception as exc:  # OpenVINO's RuntimeError
                raise BackboneError(f"backbone inference failed: {_first_line(exc)}") from None
            return self._request.get_output_tensor(0).data.copy()

    def submit(self, batch: np.ndarray, userdata: Any,
               callback: Callable[[np.ndarray | None, Any, float], None]) -> None:
        """Start an asynchronous inference; ``callback(features, userdata, seconds)`` runs when it is done.

        ``seconds`` is the inference's own duration (OpenVINO's request latency), without the wait
        for a free request. ``features`` is ``None`` when the inference failed.

        Blocks only while all ``streams`` requests are busy.
        """
        self._check(batch)
        with self._lock:
            if self.compiled is None:
                raise BackboneError(f"{self.xml}: the backbone is closed")
            if self._queue is None:
                self._queue = ov.AsyncInferQueue(self.compiled, max(1, self._streams))
                self._queue.set_callback(self._done)
            queue = self._queue
        try:
            queue.start_async({0: batch}, (callback, userdata), share_inputs=False)
        except Exception as exc:  # OpenVINO's RuntimeError: one frame fails, the caller reports it
            raise BackboneError(f"backbone inference could not start: {_first_line(exc)}") from None

    @staticmethod
    def _done(request: ov.InferRequest, payload: tuple[Callable[[np.ndarray | None, Any, float], None], Any]
              ) -> None:
        """Hand the output over; ``None`` features when the request's output cannot be read (a failed run)."""
        callback, userdata = payload
        try:
            feats, seconds = request.get_output_tensor(0).data.copy(), request.latency / 1e3
        except Exception:
            feats, seconds = None, 0.0
        callback(feats, userdata, seconds)

    def wait(self) -> None:
        """Block until every submitted inference has called back."""
        queue = self._queue
        if queue is not None:
            queue.wait_all()

    def close(self) -> None:
        """Wait for submitted inferences, then drop the requests and the compiled model (frees its memory)."""
        self.wait()
        with self._lock:
            self._queue = None
            self._request = None
            self.compiled = None


def _first_line(exc: BaseException) -> str:
    """The cause in an OpenVINO exception: its text without the "Exception from src/...:117:" location lines."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    causes = [ln for ln in lines if not re.match(r"^(Exception from |Check '.*' failed at )?src/\S+:\d+:?$", ln)
              and not ln.startswith("Exception from src/")]
    return "; ".join(causes[:3]) or (lines[0] if lines else type(exc).__name__)
