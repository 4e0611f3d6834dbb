"""Shortlist, graph and pruned exact nearest-neighbour search against NumPy references and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from appliance_kernels import config
from appliance_kernels.nn_search import (
    PrunedBank,
    exact_nn_reference,
    graph_descent,
    graph_descent_reference,
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
def test_graph_descent_matches_reference_and_only_tightens(steps: int) -> None:
    x, bank, shortlist = problem(2, 16, 60, 300, 3, seed=7)
    graph = knn_graph(bank, 8)
    d2, nearest = shortlist_nn(x, bank, shortlist)
    before = d2.copy()
    ref_d2, ref_nn = graph_descent_reference(x, bank, graph, d2, nearest, steps)
    graph_descent(x, bank, graph, d2, nearest, steps)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nearest, ref_nn)
    assert (d2 <= before).all() and (d2 < before).any()  # bounds only get tighter, and some do
    # Still true distances to the rows it names, hence upper bounds of the exact nearest distance.
    np.testing.assert_allclose(d2, ((queries(x) - bank[nearest]) ** 2).sum(1), rtol=1e-5, atol=1e-5)
    exact = ((queries(x)[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1).min(1)
    assert (d2 >= exact * (1 - 1e-5) - 1e-6).all()


def test_graph_descent_with_many_steps_reaches_the_exact_neighbour_on_a_well_connected_graph() -> None:
    x, bank, shortlist = problem(1, 8, 40, 80, 1, seed=3)
    graph = knn_graph(bank, 79)  # complete graph: one step from anywhere reaches the nearest row
    d2, nearest = shortlist_nn(x, bank, shortlist)
    graph_descent(x, bank, graph, d2, nearest, 1)
    exact = ((queries(x)[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(nearest, exact.argmin(1))


def test_graph_descent_validation() -> None:
    x, bank, shortlist = problem(1, 8, 10, 20, 2, seed=2)
    d2, nearest = shortlist_nn(x, bank, shortlist)
    with pytest.raises(ValueError, match="graph must be"):
        graph_descent(x, bank, knn_graph(bank, 3).astype(np.int64), d2, nearest)
    with pytest.raises(ValueError, match="graph rows must index the bank"):
        graph_descent(x, bank, np.full((20, 3), 25, np.int32), d2, nearest)
    with pytest.raises(ValueError, match="dist2/nearest"):
        graph_descent(x, bank, knn_graph(bank, 3), d2[:5], nearest)


def test_graph_descent_on_some_positions_leaves_the_others_alone() -> None:
    x, bank, shortlist = problem(2, 16, 60, 300, 3, seed=8)
    graph = knn_graph(bank, 8)
    d2, nearest = shortlist_nn(x, bank, shortlist)
    ref_d2, ref_nn = graph_descent_reference(x, bank, graph, d2, nearest, 2)
    chosen = np.flatnonzero(ref_d2 < d2)[::2]  # half of the positions the descent improves
    assert chosen.size > 5
    before_d2, before_nn = d2.copy(), nearest.copy()
    graph_descent(x, bank, graph, d2, nearest, 2, positions=chosen)
    others = np.setdiff1d(np.arange(d2.size), chosen)
    np.testing.assert_array_equal(d2[others], before_d2[others])
    np.testing.assert_array_equal(nearest[others], before_nn[others])
    np.testing.assert_allclose(d2[chosen], ref_d2[chosen], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nearest[chosen], ref_nn[chosen])
    with pytest.raises(ValueError, match="positions must be"):
        graph_descent(x, bank, graph, d2, nearest, positions=np.array([d2.size]))


# --- pruned exact search --------------------------------------------------------------------------------------------


def correlated_bank(b: int, c: int, seed: int) -> np.ndarray:
    """Rows whose variance is concentrated in a few directions, as real patch features are."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.1, c)
    basis, _ = np.linalg.qr(rng.standard_normal((c, c)))
    return ((rng.standard_normal((b, c)) * scales) @ basis.T + 3.0).astype(np.float32)


@pytest.mark.parametrize(("b", "c"), [(5000, 152), (300, 40), (7, 8), (1, 3)])
def test_pruned_search_is_exact(b: int, c: int) -> None:
    bank = correlated_bank(b, c, seed=b)
    rng = np.random.default_rng(c)
    q = np.concatenate([bank[rng.integers(0, b, 20)] + rng.normal(0, 0.5, (20, c)),  # near the bank
                        rng.normal(0, 30, (5, c))]).astype(np.float32)  # far from everything
    pruned = PrunedBank(bank)
    ref_d2, ref_nn = exact_nn_reference(q, bank)
    d2, nn = pruned.search(q, np.full(len(q), np.inf, np.float32))
    assert d2.dtype == np.float32 and nn.dtype == np.int32
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(nn, ref_nn)
    # With a true upper bound (the distance to some row), the same answer.
    some = rng.integers(0, b, len(q))
    bound = ((q.astype(np.float64) - bank[some]) ** 2).sum(1).astype(np.float32) * np.float32(1.0001)
    d2b, nnb = pruned.search(q, bound)
    np.testing.assert_array_equal(nnb[nnb >= 0], ref_nn[nnb >= 0])
    np.testing.assert_allclose(np.where(nnb >= 0, d2b, bound), ref_d2, rtol=1e-3, atol=1e-3)


def test_pruned_search_reports_no_row_when_the_bound_is_already_exact() -> None:
    bank = correlated_bank(2000, 64, seed=1)
    q = bank[[5, 17]] + np.float32(0.25)
    ref_d2, _ = exact_nn_reference(q, bank)
    d2, nn = PrunedBank(bank).search(q, (ref_d2 * (1 - 1e-4)).astype(np.float32))
    assert (nn == -1).all()
    np.testing.assert_allclose(d2, ref_d2 * (1 - 1e-4), rtol=1e-6)  # the bound comes back unchanged


def test_pruned_search_finds_rows_added_later() -> None:
    bank = correlated_bank(1000, 32, seed=2)
    pruned = PrunedBank(bank[:900])
    pruned.add(bank[900:])
    q = bank[[3, 950, 999]] + np.float32(0.01)
    d2, nn = pruned.search(q, np.full(3, np.inf, np.float32))
    np.testing.assert_array_equal(nn, [3, 950, 999])
    np.testing.assert_allclose(d2, exact_nn_reference(q, bank)[0], rtol=1e-3, atol=1e-4)


def test_pruned_search_drops_most_rows_early_on_correlated_data() -> None:
    """The point of the rotation: the leading coordinates carry most of the distance."""
    bank = correlated_bank(3000, 152, seed=4)
    pruned = PrunedBank(bank)
    q = pruned.rotate(bank[:10] + np.float32(0.1))
    rows = pruned.rows.astype(np.float64)
    head = config.PRUNE_HEAD
    partial = ((q[:, None, :head] - rows[None, :, :head]) ** 2).sum(-1)
    full = ((q[:, None, :] - rows[None]) ** 2).sum(-1)
    np.testing.assert_allclose(full.min(1), exact_nn_reference(bank[:10] + np.float32(0.1), bank)[0], rtol=1e-3)
    assert (partial >= full.min(1, keepdims=True)).mean() > 0.95  # rows abandoned after the head


def test_pruned_search_validation() -> None:
    pruned = PrunedBank(correlated_bank(50, 8, seed=5))
    with pytest.raises(ValueError, match="queries must be"):
        pruned.search(np.zeros((2, 9), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="one value per query"):
        pruned.search(np.zeros((2, 8), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        PrunedBank(np.zeros((0, 8), np.float32))


@pytest.mark.parametrize(("b", "k"), [(4000, 9), (300, 3), (5, 9)])
def test_pruned_knn_is_exact(b: int, k: int) -> None:
    bank = correlated_bank(b, 48, seed=k)
    q = bank[[0, b // 2, b - 1]] + np.float32(0.05)
    d2, rows = PrunedBank(bank).knn(q, k)
    found = min(k, b)
    ref_d2, ref_rows = exact_nn_reference(q, bank, k=found)
    np.testing.assert_array_equal(rows[:, :found], ref_rows)
    np.testing.assert_allclose(d2[:, :found], ref_d2, rtol=1e-3, atol=1e-4)
    assert (rows[:, found:] == -1).all() and np.isinf(d2[:, found:]).all()
    with pytest.raises(ValueError, match="k must be"):
        PrunedBank(bank).knn(q, 0)
