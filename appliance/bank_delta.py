"""The learned rows of a bundle's memory bank on disk: one file per label, one index, crash-safe.

An operator's "good" labels add rows to a PatchCore bank live (``Engine.learn_good``); the
bundle itself is never rewritten (it is signed and verified). Its *delta* lives beside it::

    <folder>/index.json        entry ids in order with each file's sha256, the model id, the base
                               bank's identity, and the golden images' raw scores with the delta applied
    <folder>/<entry_id>.npz    one entry: rows (float16), positions, scores before/after, seconds

Every file is written under a temporary name, fsynced and renamed, and the folder fsynced:
the index is the commit point. A kill between the two writes of ``append`` leaves an entry file
the index does not name; ``load`` removes it. An index naming a missing or altered file, or
written for another model, is refused: replaying it would give a bank nobody learned.

At start: ``load_bundle`` (golden images checked on the fitted bank), ``store.load()``,
``engine.apply_learned(entries)``, then ``verify_golden_with_delta`` with ``store.golden``, so a
delta replayed on another runtime must reproduce its own effect on the golden images too.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path

import numpy as np

from .atomic import fsync_folder, write_atomic
from .bundle import GOLDEN_TOLERANCE
from .engine import Engine, Learned
from .errors import ApplianceError, BundleError
from .imaging import read_image

log = logging.getLogger(__name__)

FORMAT = "anomaly-appliance-bank-delta"
FORMAT_VERSION = 1
INDEX = "index.json"
_ENTRY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TMP = ".tmp"


def _entry_bytes(learned: Learned) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, entry_id=np.array(learned.entry_id), rows=np.ascontiguousarray(learned.rows, np.float16),
             positions=np.ascontiguousarray(learned.positions, np.int64),
             scores=np.array([learned.score_before, learned.score_after, learned.seconds], np.float64))
    return buf.getvalue()


def _read_entry(path: Path, entry_id: str) -> Learned:
    with np.load(path, allow_pickle=False) as z:
        rows, positions, scores = z["rows"], z["positions"], z["scores"]
        stored_id = str(z["entry_id"])
    if stored_id != entry_id or rows.dtype != np.float16 or rows.ndim != 2 or positions.shape != (rows.shape[0],) \
            or scores.shape != (3,):
        raise BundleError(f"{path}: not the learned entry {entry_id!r} the index names; the delta was altered")
    return Learned(entry_id, rows, positions, float(scores[0]), float(scores[1]), float(scores[2]))


class DeltaStore:
    """The learned entries of one model's bank, in a folder of their own.

    Args:
        folder: where the delta lives (created at the first ``append``).
        model_id: the bundle's model id; a delta written for another is refused.
        base_identity: ``Engine.base_identity()`` of the bundle: the fitted bank the rows were learned on.
        max_rows: most rows the delta may hold (``Engine.max_learned_rows``; ``None``: no cap).

    """

    def __init__(self, folder: str | Path, model_id: str, base_identity: str, max_rows: int | None = None) -> None:
        self.folder = Path(folder)
        self.model_id = model_id
        self.base_identity = base_identity
        self.max_rows = max_rows
        self._entries: list[dict] | None = None  # the index's entries, once read
        self._golden: list[float] | None = None

    # ------------------------------------------------------------ reading
    def load(self) -> list[Learned]:
        """The entries the index names, in order, each checked against its sha256; orphans are removed.

        Raises:
            BundleError: the index is unreadable, for another model or base bank, or names a file
                that is missing or altered.

        """
        self._entries = None  # read the folder as it is now
        index = self._read_index()
        entries = []
        for rec in index["entries"]:
            path = self.folder / rec["file"]
            if not path.is_file():
                raise BundleError(f"{self.folder}: learned entry {rec['file']} is missing; the delta is incomplete "
                                  "(restore it from a backup, or remove the folder to drop every learned label)")
            if hashlib.sha256(path.read_bytes()).hexdigest() != rec["sha256"]:
                raise BundleError(f"{self.folder}: learned entry {rec['file']} does not match its sha256; the delta "
                                  "was altered (restore it from a backup, or remove the folder)")
            entries.append(_read_entry(path, rec["id"]))
        self._remove_orphans({rec["file"] for rec in index["entries"]})
        return entries

    @property
    def golden(self) -> list[float] | None:
        """The golden images' raw scores recorded with the delta applied (``None``: no delta yet)."""
        self._read_index()
        return None if self._golden is None else list(self._golden)

    @property
    def rows(self) -> int:
        """Rows the delta holds."""
        return sum(rec["rows"] for rec in self._read_index()["entries"])

    def _read_index(self) -> dict:
        path = self.folder / INDEX
        if self._entries is not None:
            return {"entries": self._entries}
        if not path.is_file():
            self._entries, self._golden = [], None
            return {"entries": self._entries}
        try:
            index = json.loads(path.read_text())
            entries = index["entries"]
            if index.get("format") != FORMAT or not isinstance(entries, list):
                raise KeyError("format")
            for rec in entries:
                if not (isinstance(rec.get("id"), str) and _ENTRY_ID.fullmatch(rec["id"])
                        and rec.get("file") == f"{rec['id']}.npz"
                        and isinstance(rec.get("sha256"), str) and isinstance(rec.get("rows"), int)):
                    raise KeyError("entries")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"{path}: not a readable bank-delta index ({exc}); it was altered") from None
        if index.get("version") != FORMAT_VERSION:
            raise BundleError(f"{path}: bank-delta version {index.get('version')!r}, this appliance reads "
                              f"{FORMAT_VERSION}")
        if index.get("model_id") != self.model_id:
            raise BundleError(f"{path}: this delta was learned on model {index.get('model_id')!r}, not "
                              f"{self.model_id!r}; its rows mean nothing to this bundle (move the folder away)")
        if index.get("base_identity") != self.base_identity:
            raise BundleError(f"{path}: this delta was learned on bank {index.get('base_identity')!r}, the bundle's "
                              f"is {self.base_identity!r} (move the folder away)")
        golden = index.get("golden")
        self._entries = entries
        self._golden = None if golden is None else [float(v) for v in golden]
        return {"entries": self._entries}

    def _remove_orphans(self, indexed: set[str]) -> None:
        """Entry files the index does not name (a kill between the two writes) and temporary files."""
        removed = []
        for path in self.folder.glob("*") if self.folder.is_dir() else []:
            orphan = path.suffix == ".npz" and path.name not in indexed
            if path.is_file() and (orphan or path.name.endswith(_TMP)):
                path.unlink()
                removed.append(path.name)
        if removed:
            fsync_folder(self.folder)
            log.warning("bank delta %s: removed %s, which no index named (an interrupted write)", self.folder,
                        ", ".join(sorted(removed)))

    # ------------------------------------------------------------ writing
    def append(self, learned: Learned, golden: list[float]) -> None:
        """Add one entry: its file first, then the index naming it (the commit).

        Args:
            learned: what ``Engine.learn_good`` returned.
            golden: the golden images' raw scores with this entry applied (``golden_scores``).

        """
        entries = self._read_index()["entries"]
        if not _ENTRY_ID.fullmatch(learned.entry_id):
            raise BundleError(f"entry id {learned.entry_id!r} cannot name a file: use up to 128 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit")
        if any(rec["id"] == learned.entry_id for rec in entries):
            raise BundleError(f"{self.folder}: entry {learned.entry_id!r} is stored already")
        rows = self.rows + learned.rows.shape[0]
        if self.max_rows is not None and rows > self.max_rows:
            raise BundleError(f"{self.folder}: the bank delta is full ({rows} rows would pass its cap of "
                              f"{self.max_rows}); a rebuild is due")
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True)
            fsync_folder(self.folder.parent)  # the folder itself survives a power cut
        data = _entry_bytes(learned)
        name = f"{learned.entry_id}.npz"
        write_atomic(self.folder / name, data, sync_folder=True)
        record = {"id": learned.entry_id, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
                  "rows": int(learned.rows.shape[0])}
        self._commit([*entries, record], golden)

    def remove(self, entry_id: str, golden: list[float]) -> None:
        """Drop one entry: the index without it first (the commit), then its file.

        Args:
            entry_id: the entry ``Engine.forget`` took back.
            golden: the golden images' raw scores without it.

        """
        entries = self._read_index()["entries"]
        if not any(rec["id"] == entry_id for rec in entries):
            raise BundleError(f"{self.folder}: no stored entry {entry_id!r}")
        self._commit([rec for rec in entries if rec["id"] != entry_id], golden)
        (self.folder / f"{entry_id}.npz").unlink(missing_ok=True)
        fsync_folder(self.folder)

    def _commit(self, entries: list[dict], golden: list[float]) -> None:
        index = {"format": FORMAT, "version": FORMAT_VERSION, "model_id": self.model_id,
                 "base_identity": self.base_identity, "entries": entries, "golden": [float(v) for v in golden]}
        write_atomic(self.folder / INDEX, json.dumps(index, indent=1) + "\n", sync_folder=True)
        self._entries, self._golden = entries, [float(v) for v in golden]


# ---------------------------------------------------------------- golden images with the delta
def golden_scores(engine: Engine, bundle_path: Path, manifest: dict) -> list[float]:
    """Raw scores of the bundle's golden images on the engine's bank as it is now (delta applied)."""
    return [engine.score(read_image(Path(bundle_path) / rec["file"])).image_score
            for rec in manifest.get("golden", [])]


def verify_golden_with_delta(engine: Engine, bundle_path: Path, manifest: dict, recorded: list[float] | None) -> None:
    """Refuse a replayed delta whose golden-image scores differ from those recorded when it was written.

    The bundle's own check (``bundle.check_golden_images``) ran on the fitted bank; this one shows
    that the rows replayed here have the effect they had where they were learned. The tolerance is
    the bundle's (relative to the larger of the recorded score and the threshold).

    Raises:
        BundleError: a golden image scores outside the tolerance, or the recorded list does not fit.

    """
    if recorded is None:
        return  # nothing learned yet
    scores = golden_scores(engine, bundle_path, manifest)
    if len(scores) != len(recorded):
        raise BundleError(f"{bundle_path}: the bank delta recorded {len(recorded)} golden scores, the bundle has "
                          f"{len(scores)} golden images; the delta belongs to another bundle")
    tol = GOLDEN_TOLERANCE.get(engine.backbone.precision, 0.08)
    if engine.calibration is None:
        raise ApplianceError("an engine without calibration has no golden check")
    threshold = abs(engine.calibration.threshold)
    for rec, raw, ref in zip(manifest.get("golden", []), scores, recorded, strict=True):
        if abs(raw - ref) > tol * max(abs(ref), threshold, 1e-6):
            raise BundleError(
                f"{bundle_path}: golden image {rec['file']} scores {raw:.5g} with the learned delta here but {ref:.5g} "
                f"where the delta was written (tolerance {tol:.0%}); the replayed rows do not have their effect "
                "(remove the delta folder to run on the fitted bank)")
