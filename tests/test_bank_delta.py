"""The learned rows on disk: a round trip into a fresh engine, interrupted writes, tampering, golden scores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import appliance
from appliance.bank_delta import INDEX, DeltaStore, golden_scores, verify_golden_with_delta
from appliance.bundle import load_bundle
from appliance.datasets import load_mvtec
from appliance.engine import Engine, Learned
from appliance.errors import BundleError, ScorerError
from appliance.imaging import read_image
from appliance.training import FitOptions, fit

SAMPLE = Path(appliance.__file__).parent / "samples" / "ball_screw"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PatchCore bundle on the bundled ball-screw sample."""
    out = tmp_path_factory.mktemp("delta") / "bundle"
    return fit(load_mvtec(SAMPLE, calibration_fraction=0.2), out,
               FitOptions(height=96, settings={"coreset_ratio": 0.1})).bundle


@pytest.fixture(scope="module")
def goods() -> list[np.ndarray]:
    return [read_image(p) for p in sorted((SAMPLE / "test" / "good").glob("*.jpg"))]


@pytest.fixture(scope="module")
def probe(goods: list[np.ndarray]) -> list[np.ndarray]:
    return goods[::2] + [read_image(p) for p in sorted((SAMPLE / "test" / "pitting").glob("*.jpg"))[::3]]


def store_for(engine: Engine, folder: Path) -> DeltaStore:
    return DeltaStore(folder, engine.model_id, engine.base_identity(), engine.max_learned_rows)


def lit(image: np.ndarray, gain: float = 1.15) -> np.ndarray:
    return np.clip(image * gain, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def learned_pair(bundle: Path, goods: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Engine, Path]:
    """An engine that learned two labels live, and the store they were written to as they came."""
    engine = load_bundle(bundle)
    store = store_for(engine, tmp_path_factory.mktemp("store") / "delta")
    worst = max(goods, key=lambda g: engine.score(g).image_score)
    for entry_id, image, target in (("insp-0001", worst, 0.45), ("insp-0002", lit(goods[4]), 0.3)):
        learned = engine.learn_good(image, entry_id, target)
        assert learned.rows.shape[0] >= 1
        store.append(learned, golden_scores(engine, bundle, engine.manifest))
    return engine, store.folder


def same_entry(a: Learned, b: Learned) -> bool:
    return (a.entry_id == b.entry_id and a.rows.dtype == b.rows.dtype and np.array_equal(a.rows, b.rows)
            and np.array_equal(a.positions, b.positions)
            and (a.score_before, a.score_after, a.seconds) == (b.score_before, b.score_after, b.seconds))


def test_a_stored_delta_replayed_in_a_fresh_engine_scores_as_the_live_one(bundle: Path, learned_pair, probe) -> None:
    live, folder = learned_pair
    fresh = load_bundle(bundle)
    store = store_for(fresh, folder)
    entries = store.load()
    assert all(same_entry(a, b) for a, b in zip(entries, live.learned, strict=True))
    fresh.apply_learned(entries)
    assert [fresh.score(p).image_score for p in probe] == [live.score(p).image_score for p in probe]
    assert fresh.bank_identity() == live.bank_identity() != fresh.base_identity()
    verify_golden_with_delta(fresh, bundle, fresh.manifest, store.golden)
    index = json.loads((folder / INDEX).read_text())
    assert [e["id"] for e in index["entries"]] == ["insp-0001", "insp-0002"]
    assert index["model_id"] == fresh.model_id and index["base_identity"] == fresh.base_identity()
    assert store.rows == sum(e.rows.shape[0] for e in entries)


def test_entries_that_do_not_fit_the_model_are_refused_before_any_goes_in(bundle: Path, learned_pair) -> None:
    live, _ = learned_pair
    fresh = load_bundle(bundle)
    good = live.learned[0]
    with pytest.raises(ScorerError, match=r"'other' .* does not fit this model"):
        fresh.apply_learned([good, Learned("other", good.rows[:, :100], good.positions, 0.9, 0.2, 0.1)])
    with pytest.raises(ScorerError, match="repeat an id"):
        fresh.apply_learned([good, good])
    assert fresh.learned == [] and fresh.scorer.learned_rows == 0 and fresh.bank_identity() == fresh.base_identity()


def test_a_golden_score_the_replay_does_not_reproduce_is_refused(bundle: Path, learned_pair) -> None:
    live, folder = learned_pair
    recorded = store_for(live, folder).golden
    shifted = [recorded[0] * 1.5 + 1.0, *recorded[1:]]
    with pytest.raises(BundleError, match=r"golden image golden/00.png scores .* with the learned delta"):
        verify_golden_with_delta(live, bundle, live.manifest, shifted)
    with pytest.raises(BundleError, match="recorded 1 golden scores"):
        verify_golden_with_delta(live, bundle, live.manifest, recorded[:1])


def copy_store(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for path in folder.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


def test_an_entry_file_no_index_names_is_dropped_at_load(learned_pair, tmp_path: Path) -> None:
    live, folder = learned_pair
    store = copy_store(folder, tmp_path / "delta")
    (store / "insp-0003.npz").write_bytes((store / "insp-0002.npz").read_bytes())  # killed before its index write
    (store / ".insp-0004.npz.1234.tmp").write_bytes(b"half an entr")  # killed while writing the entry itself
    entries = store_for(live, store).load()
    assert [e.entry_id for e in entries] == ["insp-0001", "insp-0002"]
    assert sorted(p.name for p in store.iterdir()) == [INDEX, "insp-0001.npz", "insp-0002.npz"]


@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_an_index_naming_an_altered_or_missing_file_is_refused(learned_pair, tmp_path: Path, damage: str) -> None:
    live, folder = learned_pair
    store = copy_store(folder, tmp_path / "delta")
    entry = store / "insp-0002.npz"
    if damage == "altered":
        data = bytearray(entry.read_bytes())
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))
    else:
        entry.unlink()
    reason = "does not match its sha256" if damage == "altered" else "is missing"
    with pytest.raises(BundleError, match=f"learned entry insp-0002.npz {reason}"):
        store_for(live, store).load()


def test_a_delta_of_another_model_or_bank_is_refused(learned_pair) -> None:
    live, folder = learned_pair
    with pytest.raises(BundleError, match=r"learned on model .* not 'patchcore-other'"):
        DeltaStore(folder, "patchcore-other", live.base_identity()).load()
    with pytest.raises(BundleError, match=r"learned on bank .* the bundle's is '0123'"):
        DeltaStore(folder, live.model_id, "0123").load()


def entry(i: int, rows: int = 400) -> Learned:
    rng = np.random.default_rng(i)
    return Learned(f"e{i:03d}", rng.normal(0, 1, (rows, 152)).astype(np.float16), rng.integers(0, 500, rows),
                   0.9, 0.2, 0.05)


def test_remove_and_the_row_cap(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "delta", "patchcore-x", "base", max_rows=1000)
    assert store.load() == [] and store.golden is None
    store.append(entry(0), [1.0])
    store.append(entry(1), [1.5])
    with pytest.raises(BundleError, match=r"the bank delta is full \(1200 rows would pass its cap of 1000\)"):
        store.append(entry(2), [2.0])
    with pytest.raises(BundleError, match="stored already"):
        store.append(entry(1), [2.0])
    with pytest.raises(BundleError, match="cannot name a file"):
        store.append(Learned("../evil", entry(3).rows, entry(3).positions, 0, 0, 0), [0.0])
    store.remove("e000", [1.25])
    again = DeltaStore(tmp_path / "delta", "patchcore-x", "base")
    assert [e.entry_id for e in again.load()] == ["e001"] and again.golden == [1.25]
    assert sorted(p.name for p in (tmp_path / "delta").iterdir()) == ["e001.npz", INDEX]


_APPENDER = """
import sys
import numpy as np
from pathlib import Path
from appliance.bank_delta import DeltaStore
from appliance.engine import Learned
folder, start = Path(sys.argv[1]), int(sys.argv[2])
store = DeltaStore(folder, "patchcore-x", "base")
assert len(store.load()) == start
print("ready", flush=True)
for i in range(start, start + 1000):
    rng = np.random.default_rng(i)
    store.append(Learned(f"e{i:03d}", rng.normal(0, 1, (2000, 152)).astype(np.float16), rng.integers(0, 500, 2000),
                         0.9, 0.2, 0.05), [float(i)])
"""


def test_a_kill_during_append_leaves_the_old_or_the_new_state(tmp_path: Path) -> None:
    """SIGKILL a process appending entries at random moments: every load gives whole entries, in order."""
    folder = tmp_path / "delta"
    rng = np.random.default_rng(7)
    count = 0
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(folder), str(count)], stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.15)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        store = DeltaStore(folder, "patchcore-x", "base")
        entries = store.load()
        assert [e.entry_id for e in entries] == [f"e{i:03d}" for i in range(len(entries))]
        assert len(entries) >= count
        assert store.golden == (None if not entries else [float(len(entries) - 1)])
        for e in entries:
            assert same_entry(e, Learned(e.entry_id, *entry_rows(int(e.entry_id[1:])), 0.9, 0.2, 0.05))
        left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        assert left == sorted([f"{e.entry_id}.npz" for e in entries] + ([INDEX] if entries else []))
        count = len(entries)
    assert count > 0  # the appends did run between the kills


def entry_rows(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    return rng.normal(0, 1, (2000, 152)).astype(np.float16), rng.integers(0, 500, 2000)
