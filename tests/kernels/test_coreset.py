"""Greedy k-center coreset: the Numba kernels (plain and pruned) against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
from appliance_kernels.coreset import greedy_coreset, greedy_coreset_reference, projection_matrix


def gaussian_blobs(n: int, d: int, seed: int, centres: int = 7) -> np.ndarray:
    """Clustered float32 data (like patch features: a few modes, spread within each)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, d)) * 4
    return (means[rng.integers(0, centres, n)] + rng.standard_normal((n, d))).astype(np.float32)


def brute_nearest(x: np.ndarray, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared distance (float64) from every row to every selected row, and the argmin position."""
    x64 = x.astype(np.float64)
    d2 = ((x64[:, None, :] - x64[selected][None, :, :]) ** 2).sum(-1)
    return d2, d2.argmin(1)


# --- equality with the reference ----------------------------------------------------------------------------------


def min_relative_gap(x: np.ndarray, k: int, first: int) -> float:
    """Smallest relative gap between the two largest min-distances over the greedy steps (float64).

    Far above float32 rounding, so no argmax can flip between the kernel and the reference.
    """
    x = x.astype(np.float64)
    min_d2 = ((x - x[first]) ** 2).sum(1)
    gap = np.inf
    for _ in range(1, k):
        lo, hi = np.partition(min_d2, -2)[-2:]
        gap = min(gap, (hi - lo) / hi)
        min_d2 = np.minimum(min_d2, ((x - x[int(np.argmax(min_d2))]) ** 2).sum(1))
    return gap


@pytest.mark.parametrize(
    ("n", "d", "k", "clusters", "seed"),
    [
        (300, 4, 40, 8, 0),  # pruning from the 9th pick on
        (1000, 16, 100, 24, 0),
        (2500, 40, 150, 32, 3),
        (513, 3, 60, 1, 0),  # a single pruning group at first
        (257, 152, 30, 512, 0),  # clusters > k: the plain loop does everything
        (50, 8, 30, 8, 0),  # N < number of chunks in the plain kernel (empty chunks)
    ],
)
@pytest.mark.parametrize("pruned", [True, False])
def test_matches_reference_without_projection(n: int, d: int, k: int, clusters: int, seed: int, pruned: bool) -> None:
    x = gaussian_blobs(n, d, seed=seed)
    got = greedy_coreset(x, k, projection_dim=None, seed=k, clusters=clusters if pruned else 0)
    assert got.dtype == np.int64 and got.shape == (k,)
    assert min_relative_gap(x, k, int(got[0])) > 1e-5  # the data has no near-ties (see the helper)
    want = greedy_coreset_reference(x, k, int(got[0]))
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) == k  # distinct points: no row is picked twice


def test_pruned_and_plain_loops_select_the_same_rows_with_projection() -> None:
    x = gaussian_blobs(3000, 152, seed=3)
    plain = greedy_coreset(x, 120, projection_dim=24, seed=11, clusters=0)
    pruned = greedy_coreset(x, 120, projection_dim=24, seed=11, clusters=20)
    np.testing.assert_array_equal(pruned, plain)
    # ... and it is the reference's greedy run on the projected rows.
    projected = x @ projection_matrix(152, 24, 11)
    np.testing.assert_array_equal(plain, greedy_coreset_reference(projected, 120, int(plain[0])))


def test_first_pick_depends_on_seed_only() -> None:
    x = gaussian_blobs(500, 8, seed=0)
    firsts = {int(greedy_coreset(x, 3, projection_dim=None, seed=s)[0]) for s in range(8)}
    assert len(firsts) > 1  # the seed picks the first centre
    a = greedy_coreset(x, 30, projection_dim=None, seed=5)
    b = greedy_coreset(x, 30, projection_dim=None, seed=5)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("clusters", [0, 4])
def test_duplicated_rows_match_reference_while_distinct_rows_remain(clusters: int) -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((50, 6)).astype(np.float32)
    x = base[rng.integers(0, 50, 400)]  # every row appears ~8 times
    distinct = len(np.unique(x, axis=0))
    got = greedy_coreset(x, distinct, projection_dim=None, seed=2, clusters=clusters)
    np.testing.assert_array_equal(got, greedy_coreset_reference(x, distinct, int(got[0])))
    # Greedy k-center with k = number of distinct rows picks one copy of each.
    assert len(np.unique(x[got], axis=0)) == distinct


def test_pruned_loop_breaks_ties_like_the_plain_loop() -> None:
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2).astype(np.float32)
    plain = greedy_coreset(grid, 40, projection_dim=None, seed=0, clusters=0)
    np.testing.assert_array_equal(plain, greedy_coreset_reference(grid, 40, int(plain[0])))  # holds
    pruned = greedy_coreset(grid, 40, projection_dim=None, seed=0, clusters=4)
    np.testing.assert_array_equal(pruned, plain)


def test_pruned_loop_matches_reference_past_the_distinct_rows() -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((50, 6)).astype(np.float32)
    x = base[rng.integers(0, 50, 400)]
    got = greedy_coreset(x, 60, projection_dim=None, seed=0, clusters=5)
    np.testing.assert_array_equal(got, greedy_coreset_reference(x, 60, int(got[0])))


# --- edge sizes and dtypes ----------------------------------------------------------------------------------------


def test_k_equal_one_returns_the_seeded_first_row() -> None:
    x = gaussian_blobs(100, 5, seed=4)
    got, assign = greedy_coreset(x, 1, projection_dim=None, seed=9, return_assignment=True)
    assert got.shape == (1,) and 0 <= got[0] < 100
    assert got[0] == greedy_coreset(x, 1, projection_dim=None, seed=9)[0]  # the seed decides the first centre
    np.testing.assert_array_equal(assign, np.zeros(100, np.int32))


@pytest.mark.parametrize("clusters", [0, 6])
def test_k_equal_n_is_a_permutation_in_reference_order(clusters: int) -> None:
    x = gaussian_blobs(70, 5, seed=5)
    got, assign = greedy_coreset(x, 70, projection_dim=None, clusters=clusters, return_assignment=True)
    np.testing.assert_array_equal(np.sort(got), np.arange(70))
    np.testing.assert_array_equal(got, greedy_coreset_reference(x, 70, int(got[0])))
    # Every row is selected, so each row's nearest selected row is itself.
    np.testing.assert_array_equal(got[assign], np.arange(70))


@pytest.mark.parametrize("clusters", [0, 16])
def test_float16_input_equals_reference_on_the_float32_values(clusters: int) -> None:
    x16 = gaussian_blobs(800, 24, seed=6).astype(np.float16)
    got = greedy_coreset(x16, 60, projection_dim=None, seed=1, clusters=clusters)
    x32 = x16.astype(np.float32)
    np.testing.assert_array_equal(got, greedy_coreset_reference(x32, 60, int(got[0])))
    np.testing.assert_array_equal(got, greedy_coreset(x32, 60, projection_dim=None, seed=1, clusters=clusters))


def test_projection_dim_at_least_d_uses_the_features_as_they_are() -> None:
    x = gaussian_blobs(400, 10, seed=7)
    plain = greedy_coreset(x, 30, projection_dim=None, seed=2)
    np.testing.assert_array_equal(greedy_coreset(x, 30, projection_dim=10, seed=2), plain)
    np.testing.assert_array_equal(greedy_coreset(x, 30, projection_dim=64, seed=2), plain)


def test_chunked_projection_matches_one_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance_kernels import config

    x = gaussian_blobs(1000, 32, seed=8)
    whole = greedy_coreset(x, 40, projection_dim=8, seed=3, clusters=10)
    monkeypatch.setattr(config, "CHUNK_ROWS", 97)  # many chunks, last one partial
    np.testing.assert_array_equal(greedy_coreset(x, 40, projection_dim=8, seed=3, clusters=10), whole)


# --- assignment ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clusters", [0, 12])
def test_assignment_is_nearest_selected_row_in_feature_space(clusters: int) -> None:
    x = gaussian_blobs(1500, 12, seed=9)
    got, assign = greedy_coreset(x, 60, projection_dim=None, seed=4, clusters=clusters, return_assignment=True)
    assert assign.dtype == np.int32 and assign.shape == (1500,)
    assert assign.min() >= 0 and assign.max() < 60
    d2, best = brute_nearest(x, got)
    rows = np.arange(len(x))
    np.testing.assert_allclose(d2[rows, assign], d2.min(1), rtol=1e-5, atol=1e-5)
    # Where the nearest selected row is clearly nearest, the position must be exactly it.
    second = np.partition(d2, 1, axis=1)[:, 1]
    clear = second > d2.min(1) * (1 + 1e-3) + 1e-6
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(assign[clear], best[clear])
    np.testing.assert_array_equal(assign[got], np.arange(60))  # a selected row is its own nearest


@pytest.mark.parametrize("clusters", [0, 12])
def test_assignment_is_nearest_selected_row_in_projected_space(clusters: int) -> None:
    x = gaussian_blobs(2000, 96, seed=10)
    got, assign = greedy_coreset(x, 60, projection_dim=16, seed=6, clusters=clusters, return_assignment=True)
    projected = x @ projection_matrix(96, 16, 6)  # the documented space of the assignment
    d2, best = brute_nearest(projected, got)
    rows = np.arange(len(x))
    np.testing.assert_allclose(d2[rows, assign], d2.min(1), rtol=1e-4, atol=1e-4)
    second = np.partition(d2, 1, axis=1)[:, 1]
    clear = second > d2.min(1) * (1 + 1e-3) + 1e-6
    np.testing.assert_array_equal(assign[clear], best[clear])


def test_plain_selection_is_a_two_approximation_of_k_center() -> None:
    """Greedy k-center covers every row within twice the best radius among its own first k+1 picks."""
    x = gaussian_blobs(1200, 10, seed=12)
    got = greedy_coreset(x, 41, projection_dim=None, seed=0, clusters=8)
    d2, _ = brute_nearest(x, got[:40])
    radius = np.sqrt(d2.min(1).max())
    # The 41st pick is the farthest row from the first 40: its distance is the covering radius.
    assert np.isclose(np.sqrt(d2[got[40]].min()), radius, rtol=1e-5)
    # 41 picks pairwise at least `radius` apart, so no 40 centres can cover them with radius < radius/2.
    pair = np.sqrt(brute_nearest(x[got], np.arange(41))[0])
    assert pair[~np.eye(41, dtype=bool)].min() >= radius * (1 - 1e-5)


# --- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "k", "message"),
    [
        (np.zeros((0, 4), np.float32), 1, "non-empty"),
        (np.zeros(10, np.float32), 1, r"\[N, D\]"),
        (np.zeros((2, 3, 4), np.float32), 1, r"\[N, D\]"),
        (np.zeros((10, 4), np.float64), 1, "float32 or float16"),
        (np.zeros((10, 4), np.int32), 1, "float32 or float16"),
        (np.ones((10, 4), np.float32), 0, r"k must be in \[1, 10\], got 0"),
        (np.ones((10, 4), np.float32), 11, r"k must be in \[1, 10\], got 11"),
        (np.ones((10, 4), np.float32), -3, r"k must be in \[1, 10\]"),
    ],
)
def test_invalid_input_raises_value_error(features: np.ndarray, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        greedy_coreset(features, k)


def test_zero_projection_dim_is_refused() -> None:
    x = gaussian_blobs(100, 8, seed=0)
    with np.errstate(divide="ignore", invalid="ignore"), pytest.raises(ValueError, match="projection"):
        greedy_coreset(x, 5, projection_dim=0)


# --- regrouping and partitions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("regroup_factor", [0, 2, 3])
def test_repeated_regrouping_selects_what_the_reference_does(regroup_factor: int) -> None:
    x = gaussian_blobs(3000, 12, seed=13)
    got, assign = greedy_coreset(x, 200, projection_dim=None, seed=1, clusters=6, regroup_factor=regroup_factor,
                                 return_assignment=True)  # factor 2: regroups at 12, 24, 48, 96, 192 centres
    np.testing.assert_array_equal(got, greedy_coreset_reference(x, 200, int(got[0])))
    d2, _ = brute_nearest(x, got)
    np.testing.assert_allclose(d2[np.arange(len(x)), assign], d2.min(1), rtol=1e-5, atol=1e-5)


def partitioned_reference(x: np.ndarray, partitions: np.ndarray, k: int, seeds: np.ndarray) -> np.ndarray:
    """Greedy k-center within partitions (float64): after one seed per partition, each pick is the row
    farthest from the selected rows of its own partition, over all partitions."""
    x = x.astype(np.float64)
    selected = list(seeds)
    min_d2 = np.full(len(x), np.inf)
    for s in seeds:
        same = partitions == partitions[s]
        min_d2[same] = np.minimum(min_d2[same], ((x[same] - x[s]) ** 2).sum(1))
    while len(selected) < k:
        nxt = int(np.argmax(min_d2))
        selected.append(nxt)
        same = partitions == partitions[nxt]
        min_d2[same] = np.minimum(min_d2[same], ((x[same] - x[nxt]) ** 2).sum(1))
    return np.array(selected)


def assert_assigned_within_partitions(x: np.ndarray, partitions: np.ndarray, got: np.ndarray,
                                      assign: np.ndarray) -> None:
    """Each row is assigned to the nearest selected row of its own partition."""
    d2, _ = brute_nearest(x, got)
    d2[partitions[:, None] != partitions[got][None, :]] = np.inf
    np.testing.assert_allclose(d2[np.arange(len(x)), assign], d2.min(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clusters", [0, 5, 40])
def test_partitioned_selection_is_greedy_within_each_partition(clusters: int) -> None:
    x = gaussian_blobs(2400, 10, seed=14)
    partitions = np.random.default_rng(0).integers(0, 4, len(x))
    partitions[partitions == 3] = 5  # partition ids need not be consecutive
    got, assign = greedy_coreset(x, 150, projection_dim=None, seed=2, clusters=clusters, partitions=partitions,
                                 return_assignment=True)
    parts = np.unique(partitions)
    seeds = got[: len(parts)]
    assert sorted(partitions[seeds]) == list(parts)  # each partition is seeded first
    np.testing.assert_array_equal(got, partitioned_reference(x, partitions, 150, seeds))
    assert_assigned_within_partitions(x, partitions, got, assign)


def test_partitioned_pruned_and_plain_loops_agree_with_projection() -> None:
    x = gaussian_blobs(4000, 152, seed=15)
    partitions = np.arange(len(x)) % 8
    plain = greedy_coreset(x, 160, projection_dim=24, seed=3, clusters=0, partitions=partitions)
    pruned = greedy_coreset(x, 160, projection_dim=24, seed=3, clusters=16, regroup_factor=2, partitions=partitions)
    np.testing.assert_array_equal(pruned, plain)


def test_fewer_picks_than_partitions_ignore_the_partitions() -> None:
    x = gaussian_blobs(500, 6, seed=16)
    partitions = np.arange(500) % 10
    got = greedy_coreset(x, 4, projection_dim=None, seed=3, partitions=partitions)
    np.testing.assert_array_equal(got, greedy_coreset(x, 4, projection_dim=None, seed=3))


@pytest.mark.parametrize("rounds", [(0.5, 0.9, 0.97), (0.02,), (0.999,), (0.3, 0.6, 0.8, 0.95, 0.999), (1.0, 1.0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_rounds_do_not_change_the_selection(rounds: tuple[float, ...], threads: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions run in threaded rounds down to estimated distances, then a serial finish: whatever the
    rounds reach, the result is the greedy-within-partitions sequence, exactly k long."""
    from appliance_kernels import config

    x = gaussian_blobs(6000, 10, seed=17)
    partitions = np.repeat(np.arange(6), [400, 700, 1500, 900, 1200, 1300])  # unequal sizes
    monkeypatch.setattr(config, "CORESET_ROUNDS", rounds)
    got, assign = greedy_coreset(x, 300, projection_dim=None, seed=4, clusters=12, partitions=partitions,
                                 threads=threads, return_assignment=True)
    assert got.shape == (300,)
    seeds = got[:6]
    np.testing.assert_array_equal(got, partitioned_reference(x, partitions, 300, seeds))
    assert_assigned_within_partitions(x, partitions, got, assign)


def test_a_block_extended_in_steps_equals_one_extended_at_once() -> None:
    """``Greedy`` resumes where it stopped: by pick count or by distance floor."""
    from appliance_kernels.greedy import Greedy

    x = gaussian_blobs(3000, 8, seed=18)
    whole = Greedy(x.copy(), np.arange(3000), first=5, plain=10, regroup_factor=2)
    whole.extend(200)
    steps = Greedy(x.copy(), np.arange(3000), first=5, plain=10, regroup_factor=2)
    for limit in (1, 7, 31, 64, 150, 200):
        steps.extend(limit)
        assert steps.count == limit
    floor2 = float(whole.picks_d2[120])
    part = Greedy(x.copy(), np.arange(3000), first=5, plain=10, regroup_factor=2)
    part.extend(200, floor2)  # stops before the first pick at or within the floor
    assert part.count == int((whole.picks_d2[:200] > floor2).sum()) and part.next_d2 <= floor2
    part.extend(200)
    for block in (steps, part):
        np.testing.assert_array_equal(block.picks[:200], whole.picks[:200])
        np.testing.assert_array_equal(block.picks_d2[:200], whole.picks_d2[:200])
        np.testing.assert_array_equal(block.assignment(), whole.assignment())
    assert np.all(np.diff(whole.picks_d2[1:200]) <= 0)  # the farthest distance never grows
    np.testing.assert_array_equal(whole.picks[:200], greedy_coreset_reference(x, 200, 5))


@pytest.mark.parametrize("bad", [np.zeros(3, np.int64), -np.ones(100, np.int64), np.zeros(100, np.float32)])
def test_bad_partitions_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="partitions"):
        greedy_coreset(gaussian_blobs(100, 4, seed=0), 5, partitions=bad)
