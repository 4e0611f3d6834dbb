"""Training patches in a temporary file: the same rows back, clear errors, and the same PatchCore fit."""

from __future__ import annotations

import os

import numpy as np
import pytest

from appliance.errors import ScorerError
from appliance.scorers.spill import SpilledRows


def test_rows_read_back_exactly_by_slice_and_by_index(tmp_path) -> None:
    rows = np.random.default_rng(0).standard_normal((1000, 24)).astype(np.float16)
    store = SpilledRows(1000, 24, str(tmp_path))
    for start in range(0, 1000, 96):  # written in uneven pieces, like images
        store.write(start, rows[start : start + 96])
    assert not list(tmp_path.iterdir())  # the file is never visible by name
    assert store.shape == (1000, 24) and store.dtype == np.float16
    np.testing.assert_array_equal(store[:], rows)
    np.testing.assert_array_equal(store[130:517], rows[130:517])
    picks = np.array([999, 3, 3, 512, 0])
    np.testing.assert_array_equal(store[picks], rows[picks])
    assert store[np.array([], np.int64)].shape == (0, 24)
    assert store.truncate(600) is store and store.shape == (600, 24)
    with pytest.raises(IndexError, match="out of range"):
        store[np.array([600])]
    store.close()
    store.close()  # idempotent


def test_misuse_is_refused(tmp_path) -> None:
    store = SpilledRows(10, 4, str(tmp_path))
    with pytest.raises(ValueError, match="do not fit"):
        store.write(8, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="do not fit"):
        store.write(0, np.zeros((2, 5)))
    with pytest.raises(IndexError, match="contiguous"):
        store[::2]
    with pytest.raises(IndexError, match="integer"):
        store[np.array([0.5])]
    with pytest.raises(ScorerError, match="ended early"):
        store[0:2]  # nothing written yet
    with pytest.raises(ValueError, match="truncate"):
        store.truncate(11)


def test_a_full_disk_is_a_clear_scorer_error(tmp_path) -> None:
    store = SpilledRows(10, 4, str(tmp_path))
    os.close(store._fd)
    store._fd = os.open("/dev/full", os.O_WRONLY)  # the kernel's always-full device: every write gets ENOSPC
    with pytest.raises(ScorerError, match=r"no room for 0 MB of training patches in .*TMPDIR"):
        store.write(0, np.ones((2, 4)))
    store.close()


def test_an_unusable_temporary_folder_is_a_clear_scorer_error(tmp_path) -> None:
    with pytest.raises(ScorerError, match=r"cannot create a temporary file for training patches in .*missing"):
        SpilledRows(10, 4, str(tmp_path / "missing"))
