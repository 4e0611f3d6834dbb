"""Shortlist nearest-neighbour search against the NumPy reference and a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest
from appliance_kernels.nn_search import (
    check_graph,
    graph_beam,
    graph_beam_reference,
    shortlist_nn,
    shortlist_nn_reference,
)


def problem(t: int, c: int, p: int, b: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries ``[T, C, P]``, a bank ``[B, C]`` and distinct random shortlists ``[T*P, L]``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, c, p)).astype(np.float32)
    bank = rng.standard_normal((b, c)).astype(np.float32)
    shortlist = np.stack([rng.choice(b, length, replace=False) for _ in range(t * p)]).astype(np.int32)
    return x, bank, shortlist


def queries(x: np.ndarray) -> np.ndarray:
    """``[T*P, C]`` float64 query vectors in the kernel's position order."""
    return x.transpose(0, 2, 1).reshape(-1, x.shape[1]).astype(np.float64)


@pytest.mark.parametrize(("t", "c", "p", "b", "length"), [(1, 8, 50, 40, 5), (3, 152, 64, 500, 32), (2, 16, 9, 7, 7)])
def test_matches_reference(t: int, c: int, p: int, b: int, length: int) -> None:
    x, bank, shortlist = problem(t, c, p, b, length, seed=b)
    d2, nearest = shortlist_nn(x, bank, shortlist)
    ref_d2, ref_nearest = shortlist_nn_reference(x, bank, shortlist)
    assert d2.dtype == np.float32 and nearest.dtype == np.int32 and d2.shape == nearest.shape == (t * p,)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nearest, ref_nearest)
    # The nearest row is one of the position's candidates, and d2 is the distance to it.
    assert all(nearest[q] in shortlist[q] for q in range(t * p))
    np.testing.assert_allclose(d2, ((queries(x) - bank[nearest]) ** 2).sum(1), rtol=1e-5, atol=1e-5)


def test_full_shortlist_is_exact_nearest_neighbour_search() -> None:
    x, bank, _ = problem(2, 24, 40, 60, 1, seed=1)
    everything = np.tile(np.arange(60, dtype=np.int32), (80, 1))
    d2, nearest = shortlist_nn(x, bank, everything)
    brute = ((queries(x)[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(nearest, brute.argmin(1))
    np.testing.assert_allclose(d2, brute.min(1), rtol=1e-5)


def test_shortlist_distance_is_an_upper_bound_of_the_exact_distance() -> None:
    x, bank, shortlist = problem(1, 32, 100, 300, 10, seed=2)
    d2, _ = shortlist_nn(x, bank, shortlist)
    exact = ((queries(x)[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1).min(1)
    assert (d2 >= exact * (1 - 1e-5)).all()
    assert (d2 > exact * 1.01).any()  # a 10-row shortlist out of 300 is not the exact search


def test_minus_one_padding_ends_each_shortlist() -> None:
    x, bank, full = problem(2, 12, 20, 30, 8, seed=3)
    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 9, 40)
    padded = full.copy()
    for q, n in enumerate(lengths):
        padded[q, n:] = -1
    d2, nearest = shortlist_nn(x, bank, padded)
    ref_d2, ref_nearest = shortlist_nn_reference(x, bank, padded)
    np.testing.assert_array_equal(nearest, ref_nearest)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-5, atol=1e-6)
    # Same answer as searching only the unpadded prefix of each row.
    for q, n in enumerate(lengths):
        prefix = full[q, :n]
        dist = ((bank[prefix].astype(np.float64) - queries(x)[q]) ** 2).sum(1)
        assert nearest[q] == prefix[np.argmin(dist)]


def test_ties_go_to_the_earlier_candidate() -> None:
    x = np.zeros((1, 2, 1), np.float32)
    bank = np.array([[1, 0], [0, 1], [3, 3]], np.float32)  # rows 0 and 1 are equally near
    for order, first in (([0, 1, 2], 0), ([1, 0, 2], 1), ([2, 1, 0], 1)):
        d2, nearest = shortlist_nn(x, bank, np.array([order], np.int32))
        assert nearest[0] == first and d2[0] == 1.0


def test_non_contiguous_shortlist_is_accepted() -> None:
    x, bank, shortlist = problem(1, 8, 10, 20, 6, seed=5)
    strided = np.asfortranarray(shortlist)
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(shortlist_nn(x, bank, strided)[1], shortlist_nn(x, bank, shortlist)[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, b, s: (x.astype(np.float64), b, s), "queries must be C-contiguous float32"),
        (lambda x, b, s: (x[:, :, ::2], b, s), "queries must be C-contiguous float32"),
        (lambda x, b, s: (x[0], b, s), "queries must be C-contiguous float32"),
        (lambda x, b, s: (x, b.astype(np.float16), s), "bank must be C-contiguous float32"),
        (lambda x, b, s: (x, np.asfortranarray(b), s), "bank must be C-contiguous float32"),
        (lambda x, b, s: (x, b[:, :7], s), r"bank must be C-contiguous float32 \[B, 8\]"),
        (lambda x, b, s: (x, b, s.astype(np.int64)), "shortlist must be int32"),
        (lambda x, b, s: (x, b, s[:-1]), r"shortlist must be int32 \[20, L\]"),
        (lambda x, b, s: (x, b, s[:, 0].copy()), "shortlist must be int32"),
        (lambda x, b, s: (x, b, np.where(s == s.max(), 30, s).astype(np.int32)), "must index the bank"),
        (lambda x, b, s: (x, b, np.c_[np.full((20, 1), -1, np.int32), s]), "at least one candidate"),
    ],
)
def test_validation(change, message: str) -> None:
    x, bank, shortlist = problem(2, 8, 10, 30, 4, seed=6)
    with pytest.raises(ValueError, match=message):
        shortlist_nn(*change(x, bank, shortlist))


def test_empty_shortlist_width_is_refused() -> None:
    x, bank, _ = problem(1, 8, 10, 30, 4, seed=7)
    with pytest.raises(ValueError, match="at least one candidate"):
        shortlist_nn(x, bank, np.zeros((10, 0), np.int32))


def knn_graph(bank: np.ndarray, degree: int) -> np.ndarray:
    """Exact k-NN graph of the bank rows (self excluded), int32."""
    d = ((bank[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1)[:, :degree].astype(np.int32)


@pytest.mark.parametrize("steps", [1, 3])
def test_graph_steps_match_reference_and_only_tighten(steps: int) -> None:
    x, bank, shortlist = problem(2, 16, 60, 300, 3, seed=7)
    graph = knn_graph(bank, 8)
    before, _ = shortlist_nn(x, bank, shortlist)
    d2, nearest = shortlist_nn(x, bank, shortlist, graph, steps)
    ref_d2, ref_nn = shortlist_nn_reference(x, bank, shortlist, graph, steps)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nearest, ref_nn)
    assert (d2 <= before).all() and (d2 < before).any()  # bounds only get tighter, and some do
    # Still true distances to the rows it names, hence upper bounds of the exact nearest distance.
    np.testing.assert_allclose(d2, ((queries(x) - bank[nearest]) ** 2).sum(1), rtol=1e-5, atol=1e-5)
    exact = ((queries(x)[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1).min(1)
    assert (d2 >= exact * (1 - 1e-5) - 1e-6).all()
    np.testing.assert_array_equal(shortlist_nn(x, bank, shortlist, graph, 0)[0], before)  # no steps: no graph


def test_graph_steps_reach_the_exact_neighbour_on_a_well_connected_graph() -> None:
    x, bank, shortlist = problem(1, 8, 40, 80, 1, seed=3)
    graph = knn_graph(bank, 79)  # complete graph: one step from anywhere reaches the nearest row
    _, nearest = shortlist_nn(x, bank, shortlist, graph, 1)
    exact = ((queries(x)[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(nearest, exact.argmin(1))


def test_graph_validation() -> None:
    x, bank, shortlist = problem(1, 8, 10, 20, 2, seed=2)
    with pytest.raises(ValueError, match="graph must be"):
        shortlist_nn(x, bank, shortlist, knn_graph(bank, 3).astype(np.int64), 2)
    with pytest.raises(ValueError, match="graph must be"):
        shortlist_nn(x, bank, shortlist, knn_graph(bank, 3)[:-1], 2)
    with pytest.raises(ValueError, match="max_steps"):
        shortlist_nn(x, bank, shortlist, knn_graph(bank, 3), -1)
    with pytest.raises(ValueError, match=r"graph rows must index the bank \(rows 0..19\), found 25"):
        check_graph(np.full((20, 3), 25, np.int32), 20)
    # Unchecked, a row past the bank ends its neighbour list: it is never read.
    past = knn_graph(bank, 3)
    past[:, 1] = 25
    got = shortlist_nn(x, bank, shortlist, past, 2)
    want = shortlist_nn(x, bank, shortlist, np.where(past == 25, -1, past).astype(np.int32), 2)
    np.testing.assert_array_equal(got[0], want[0])


# --- graph beam ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expand", [1, 4, 16])
def test_graph_beam_matches_reference_and_escapes_local_minima(expand: int) -> None:
    x, bank, shortlist = problem(2, 16, 60, 300, 3, seed=11)
    graph = knn_graph(bank, 6)
    d2, nearest = shortlist_nn(x, bank, shortlist, graph, 50)  # greedy descent to its local minima
    stuck = d2.copy()
    rows = np.arange(0, 120, 3, dtype=np.int64)
    targets = np.full(rows.size, -1.0, np.float32)  # never good enough: the full budget is spent
    ref_d2, ref_nn = graph_beam_reference(x, bank, graph, rows, d2, nearest, targets, expand)
    graph_beam(x, bank, graph, rows, d2, nearest, targets, expand)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nearest, ref_nn)
    untouched = np.setdiff1d(np.arange(d2.size), rows)
    np.testing.assert_array_equal(d2[untouched], stuck[untouched])
    assert (d2 <= stuck).all()
    if expand > 1:
        assert (d2[rows] < stuck[rows]).any()  # best-first search leaves minima greedy descent cannot
    np.testing.assert_allclose(d2, ((queries(x) - bank[nearest]) ** 2).sum(1), rtol=1e-5, atol=1e-5)
    exact = ((queries(x)[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1).min(1)
    assert (d2 >= exact * (1 - 1e-5) - 1e-6).all()


def test_graph_beam_stops_at_its_target() -> None:
    x, bank, shortlist = problem(1, 16, 50, 300, 2, seed=12)
    graph = knn_graph(bank, 6)
    d2, nearest = shortlist_nn(x, bank, shortlist)
    rows = np.arange(50, dtype=np.int64)
    exact = ((queries(x)[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1).min(1)
    lenient = (d2 * 1.01).astype(np.float32)  # already met: nothing moves
    before = (d2.copy(), nearest.copy())
    graph_beam(x, bank, graph, rows, d2, nearest, lenient, 32)
    np.testing.assert_array_equal(d2, before[0])
    np.testing.assert_array_equal(nearest, before[1])
    midway = ((d2 + exact) / 2).astype(np.float32)  # reachable: stop as soon as under it
    ref_d2, _ = graph_beam_reference(x, bank, graph, rows, d2, nearest, midway, 32)
    graph_beam(x, bank, graph, rows, d2, nearest, midway, 32)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-5, atol=1e-5)
    assert ((d2 <= midway) | (d2 == before[0])).mean() > 0.9


def test_graph_beam_validation() -> None:
    x, bank, shortlist = problem(1, 8, 10, 20, 2, seed=2)
    d2, nearest = shortlist_nn(x, bank, shortlist)
    graph = knn_graph(bank, 3)
    rows, targets = np.array([0, 3]), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="graph must be"):
        graph_beam(x, bank, graph.astype(np.int64), rows, d2, nearest, targets)
    with pytest.raises(ValueError, match="one length"):
        graph_beam(x, bank, graph, rows, d2, nearest, targets[:1])
    with pytest.raises(ValueError, match="rows must index"):
        graph_beam(x, bank, graph, np.array([10]), d2, nearest, targets[:1])
    with pytest.raises(ValueError, match="max_expand"):
        graph_beam(x, bank, graph, rows, d2, nearest, targets, -1)
    past = graph.copy()
    past[:, 2] = 99  # past the bank: ends each list, as a -1 does
    got, want = (d2.copy(), nearest.copy()), (d2.copy(), nearest.copy())
    graph_beam(x, bank, past, rows, *got, targets)
    graph_beam(x, bank, np.where(past == 99, -1, past).astype(np.int32), rows, *want, targets)
    np.testing.assert_array_equal(got[0], want[0])
    graph_beam(x, bank, graph, np.array([], np.int64), d2, nearest, np.array([], np.float32))  # nothing to do
