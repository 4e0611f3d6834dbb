"""PatchCore and PaDiM on real backbone features of small synthetic textures with pasted defects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from appliance.backbone import Backbone
from appliance.errors import ConfigError, ScorerError
from appliance.position_norm import PositionNorm
from appliance.scorers import SCORERS, Padim, PatchCore, create
from appliance.scorers.patchcore_bank import RowBuffer, locality_order, position_partitions

SHAPE = (96, 128)  # H, W of the images; the patch grid is 12 x 16
PATCHCORE = {"coreset_ratio": 0.1, "shortlist": 16}
PADIM = {"n_features": 60}


@dataclass(frozen=True)
class Case:
    """Backbone features ``[1, 152, 12, 16]`` of training, good test and defect images."""

    train: list[np.ndarray]
    good: list[np.ndarray]
    defects: list[tuple[str, np.ndarray, np.ndarray]]  # (name, features, pixel mask)
    odd_good: np.ndarray  # a good-looking image unlike the training set (bright, low contrast)
    extra: list[np.ndarray]  # more images for the exact-search comparison


@pytest.fixture(scope="module")
def case(backbone_xml: Path, textures) -> Case:
    bb = Backbone(backbone_xml, (1, *SHAPE))

    def feats(image: np.ndarray) -> np.ndarray:
        return bb.infer(image[None])

    rng = np.random.default_rng(0)
    train = [feats(textures.good(rng, SHAPE)) for _ in range(12)]
    good_images = [textures.good(rng, SHAPE) for _ in range(6)]
    blob, blob_mask = textures.blob(good_images[0], (84, 36), 6)
    blue, blue_mask = textures.blob(good_images[1], (24, 70), 6, (40, 60, 220))
    scratch, scratch_mask = textures.scratch(good_images[2], (30, 20), (60, 45), 2)
    defects = [("blob", feats(blob), blob_mask), ("blue_blob", feats(blue), blue_mask),
               ("scratch", feats(scratch), scratch_mask)]
    bright = textures.good(rng, SHAPE, gain=0.0) // 2 + 120  # low contrast, bright: good-looking, unlike training
    extra = []
    for i in range(10):
        image = textures.good(rng, SHAPE)
        if i % 2:
            x, y = (int(v) for v in rng.integers(10, 80, 2))
            image, _ = textures.blob(image, (x + 20, y), int(rng.integers(3, 9)), (200, 200, 60))
        extra.append(feats(image))
    return Case(train, [feats(g) for g in good_images[3:]], defects, feats(bright), extra)


def fitted(kind: str, settings: dict, case: Case, valid: np.ndarray | None = None):
    scorer = create(kind, settings)
    stats = scorer.fit(iter(case.train), len(case.train), valid)
    assert stats["images"] == len(case.train)
    return scorer


def clone(scorer, **changes):
    """A new scorer of the same type, loaded from ``scorer.state()`` (copies), with config changes."""
    settings = dict(scorer.config.__dict__) | changes
    other = create(scorer.type, settings)
    arrays, meta = scorer.state()
    other.load_state({k: np.array(v, copy=True) for k, v in arrays.items()}, dict(meta))
    return other


@pytest.fixture(scope="module")
def patchcore(case: Case) -> PatchCore:
    return fitted("patchcore", PATCHCORE, case)


@pytest.fixture(scope="module")
def padim(case: Case) -> Padim:
    return fitted("padim", PADIM, case)


# --- detection ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_pasted_defects_score_above_good_images_and_peak_inside(request: pytest.FixtureRequest, case: Case,
                                                                 hits_mask, kind: str) -> None:
    scorer = request.getfixturevalue(kind)
    good_scores = []
    for f in case.good:
        patches, score = scorer.score(f)
        assert patches.shape == (1, 12, 16) and patches.dtype == np.float32
        assert score == pytest.approx(float(patches.max()))
        good_scores.append(score)
    for name, f, mask in case.defects:
        patches, score = scorer.score(f)
        assert score > max(good_scores) * 1.2, f"{kind}: {name} scores {score} vs good {good_scores}"
        _, y, x = np.unravel_index(int(np.argmax(patches)), patches.shape)
        # Each embedding averages its 3x3 patch neighbourhood, so the peak may sit one patch off the pixels.
        assert hits_mask((y, x), mask, margin=8), f"{kind}: {name} peaks at patch {(y, x)}, outside the defect"


def test_training_images_are_covered_by_the_bank(patchcore: PatchCore, case: Case) -> None:
    """Training patches are covered by the bank within the coverage radius."""
    for f in case.train:
        assert patchcore.score(f)[1] <= patchcore.coverage_radius * (1 + 1e-5)
    assert patchcore.coverage_radius > 0


# --- PatchCore search -----------------------------------------------------------------------------------------------


def test_positional_certified_search_equals_exact_search(patchcore: PatchCore, case: Case) -> None:
    exact = clone(patchcore, candidates="none")
    features = case.good + [f for _, f, _ in case.defects] + case.extra + [case.odd_good]
    positions = 12 * 16
    partial = 0
    for f in features:
        approx_map, approx_score = patchcore.score(f)
        refined = patchcore.refined_last
        d2_fast, nn_fast = patchcore.nearest(f)
        exact_map, exact_score = exact.score(f)
        d2_exact, nn_exact = exact.nearest(f)
        assert exact.refined_last == positions
        top = int(np.argmax(exact_map))
        assert int(np.argmax(approx_map)) == top
        assert nn_fast[top] == nn_exact[top]  # the same bank row at the maximum
        # Same value up to the last bit of float32 rounding (Numba and FAISS sum the squares in another order).
        np.testing.assert_array_max_ulp(np.float32(approx_score), np.float32(exact_score), maxulp=2)
        np.testing.assert_array_max_ulp(approx_map.reshape(-1)[top], exact_map.reshape(-1)[top], maxulp=2)
        # Everywhere else the positional map is an upper bound of the exact distance.
        assert (approx_map >= exact_map * (1 - 1e-6)).all()
        assert (d2_fast >= d2_exact * (1 - 1e-6)).all()
        partial += refined < positions
    assert partial >= len(features) // 2  # the shortlists really spared most exact searches


def test_exact_search_matches_numpy_brute_force(patchcore: PatchCore, case: Case) -> None:
    exact = clone(patchcore, candidates="none")
    bank = patchcore.bank.astype(np.float64)
    for f in [*case.good[:1], case.defects[0][1]]:
        q = f.reshape(152, -1).T.astype(np.float64)
        d2 = ((q[:, None, :] - bank[None]) ** 2).sum(-1)
        patches, score = exact.score(f)
        np.testing.assert_allclose(patches.reshape(-1), np.sqrt(d2.min(1)), rtol=1e-4)
        assert score == pytest.approx(np.sqrt(d2.min(1).max()), rel=1e-4)
        _, nn = exact.nearest(f)
        np.testing.assert_allclose(d2[np.arange(len(q)), nn], d2.min(1), rtol=1e-4)  # a true nearest row
        assert (nn == d2.argmin(1)).mean() > 0.99


def test_bank_is_a_subset_of_training_patches(patchcore: PatchCore, case: Case) -> None:
    patches = np.concatenate([f.reshape(152, -1).T for f in case.train]).astype(np.float16).astype(np.float32)
    known = {row.tobytes() for row in patches}
    assert patchcore.bank.shape == (round(0.1 * len(patches)), 152)
    assert all(row.tobytes() in known for row in patchcore.bank)
    assert len({row.tobytes() for row in patchcore.bank}) == len(patchcore.bank)


@pytest.mark.parametrize(
    ("index", "extra"),
    [("hnsw", {"hnsw_m": 8, "ef_search": 8}), ("ivf", {"ivf_lists": 4, "nprobe": 1})],
)
@pytest.mark.parametrize("candidates", ["none", "positional"])
def test_approximate_indexes_run_and_bound_the_exact_score(patchcore: PatchCore, case: Case, index: str,
                                                            extra: dict, candidates: str) -> None:
    scorer = fitted("patchcore", PATCHCORE | {"index": index, "candidates": candidates} | extra, case)
    assert scorer.index.ntotal == scorer.bank.shape[0]
    np.testing.assert_array_equal(scorer.bank, patchcore.bank)  # the coreset does not depend on the index
    exact = clone(patchcore, candidates="none")
    good = []
    for f in case.good:
        score = scorer.score(f)[1]
        assert score >= exact.score(f)[1] * (1 - 1e-5)  # an approximate NN is never nearer than the true NN
        good.append(score)
    for _, f, _ in case.defects:
        assert scorer.score(f)[1] > max(good)
    restored = clone(scorer)  # the serialised FAISS index round-trips
    for f in [*case.good, case.defects[0][1]]:
        a, b = scorer.score(f), restored.score(f)
        assert a[1] == b[1]
        np.testing.assert_array_equal(a[0], b[0])


def test_reweighting_keeps_the_score_positive_and_not_above_the_maximum(patchcore: PatchCore, case: Case) -> None:
    reweighted = clone(patchcore, reweight=True)
    for f in case.good + [f for _, f, _ in case.defects]:
        plain_map, plain = patchcore.score(f)
        map_, score = reweighted.score(f)
        np.testing.assert_array_equal(map_, plain_map)  # the map is not reweighted
        assert 0 < score <= plain


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_patch_scores_for_statistics_are_every_patchs_own_distance(
        request: pytest.FixtureRequest, case: Case, kind: str) -> None:
    """Statistics need each patch's true score: bounds loose at some positions would mis-scale the norm."""
    scorer = request.getfixturevalue(kind)
    for f in [*case.good, *(f for _, f, _ in case.defects)]:
        stats, (patches, _) = scorer.patch_scores(f), scorer.score(f)
        assert stats.shape == patches.shape and stats.dtype == patches.dtype
        if kind == "padim":
            np.testing.assert_array_equal(stats, patches)
            continue
        exact = clone(scorer, candidates="none").score(f)[0]
        tol = 1e-3 * float(exact.max())  # HNSW's fp16 codes round distances
        assert (stats >= exact - tol).all()
        assert np.mean(np.abs(stats - exact) <= tol) > 0.99
        bounds = scorer._distances(scorer.nearest(f, certify=False)[0], f.shape)
        assert (stats <= bounds + tol).all()  # the refinement only tightens the shortlist bounds


def test_patchcore_warm_up_runs_every_stage_but_certifies_at_once(patchcore: PatchCore, case: Case) -> None:
    scorer = clone(patchcore)
    scorer.warm_up(case.good[0].shape)
    assert scorer.refined_last <= 2 and scorer.approx_last <= 16  # exact bounds: the first round settles it
    with pytest.raises(ScorerError, match="do not fit this bank"):
        scorer.warm_up((1, 7, 4, 4))  # a shape that cannot be scored is refused, as a frame of it would be


def test_reweighting_support_from_the_graph_matches_an_exhaustive_search(patchcore: PatchCore, case: Case) -> None:
    from_graph = clone(patchcore, reweight=True)  # graph degree 16 >= 9 - 1: support from the graph
    exhaustive = clone(patchcore, reweight=True)
    exhaustive.graph = np.zeros((exhaustive.bank.shape[0], 0), np.int32)  # too narrow: an exhaustive search
    assert from_graph.graph.shape[1] >= from_graph.config.num_neighbors - 1
    for f in [*case.good, *(f for _, f, _ in case.defects)]:
        assert from_graph.score(f)[1] == pytest.approx(exhaustive.score(f)[1], rel=1e-6)


# --- growing the bank -----------------------------------------------------------------------------------------------


def check_add_makes_a_new_good_image_normal(patchcore: PatchCore, case: Case, candidates: str) -> None:
    scorer = clone(patchcore, candidates=candidates)
    before_good = [scorer.score(f)[1] for f in case.good]
    before_defects = [scorer.score(f)[1] for _, f, _ in case.defects]
    before = scorer.score(case.odd_good)[1]
    assert before > max(before_good)  # it looks anomalous at first
    bank_size = scorer.bank.shape[0]
    added = scorer.add(case.odd_good)
    assert 1 < added <= 12 * 16
    assert scorer.bank.shape[0] == scorer.index.ntotal == bank_size + added
    # Every shortlist entry still names a bank row; the new rows head the shortlists where they came from.
    assert scorer.shortlist.max() < scorer.bank.shape[0]
    assert set(scorer.shortlist[:, 0][scorer.shortlist[:, 0] >= bank_size]) == set(range(bank_size, bank_size + added))
    after = scorer.score(case.odd_good)[1]
    assert after < before and after <= scorer.coverage_radius * (1 + 1e-5)
    # Adding rows only brings neighbours nearer: nothing scores higher than before.
    for f, old in zip(case.good, before_good, strict=True):
        assert scorer.score(f)[1] <= old * (1 + 1e-6)
    for (_, f, _), old in zip(case.defects, before_defects, strict=True):
        assert scorer.score(f)[1] <= old * (1 + 1e-6)
    assert scorer.add(case.odd_good) == 0  # already covered
    restored = clone(scorer)  # the grown bank is part of the state
    assert restored.score(case.odd_good)[1] == pytest.approx(after, rel=1e-6)


def test_add_makes_a_new_good_image_normal_with_exact_search(patchcore: PatchCore, case: Case) -> None:
    """With ``candidates="none"`` the shortlists are only carried along (still checked to index the bank)."""
    scorer = clone(patchcore, candidates="none")
    before = scorer.score(case.odd_good)[1]
    bank_size = scorer.bank.shape[0]
    added = scorer.add(case.odd_good)
    assert added > 1 and scorer.bank.shape[0] == scorer.index.ntotal == bank_size + added
    after = scorer.score(case.odd_good)[1]
    assert after < before and after <= scorer.coverage_radius * (1 + 1e-5)
    for f in case.good + [f for _, f, _ in case.defects]:
        assert scorer.score(f)[1] <= patchcore.score(f)[1] * (1 + 1e-6)
    assert scorer.add(case.odd_good) == 0
    assert clone(scorer).score(case.odd_good)[1] == pytest.approx(after, rel=1e-6)


@pytest.mark.parametrize("candidates", ["positional", "none"])
def test_add_keeps_shortlists_valid(patchcore: PatchCore, case: Case, candidates: str) -> None:
    check_add_makes_a_new_good_image_normal(patchcore, case, candidates)


# --- state --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_state_round_trip_gives_identical_scores(request: pytest.FixtureRequest, case: Case, kind: str) -> None:
    scorer = request.getfixturevalue(kind)
    arrays, _meta = scorer.state()
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    restored = clone(scorer)
    for f in case.good + [f for _, f, _ in case.defects]:
        a, b = scorer.score(f), restored.score(f)
        assert a[1] == b[1]
        np.testing.assert_array_equal(a[0], b[0])


def test_load_state_refuses_inconsistent_arrays(patchcore: PatchCore, padim: Padim) -> None:
    arrays, meta = patchcore.state()
    with pytest.raises(ScorerError, match="do not match their recorded shapes"):
        create("patchcore", PATCHCORE).load_state(arrays, meta | {"bank": meta["bank"] + 1})
    hnsw = create("patchcore", PATCHCORE | {"index": "hnsw"})
    import faiss

    small = faiss.IndexHNSWFlat(152, 8)
    small.add(patchcore.bank[:10])
    with pytest.raises(ScorerError, match="FAISS index holds 10 rows, the bank"):
        hnsw.load_state(arrays | {"faiss_index": faiss.serialize_index(small)}, meta)
    past = arrays["graph"].copy()
    past[0, 0] = meta["bank"]
    with pytest.raises(ScorerError, match="k-NN graph: graph rows must index the bank"):
        create("patchcore", PATCHCORE).load_state(arrays | {"graph": past}, meta)
    arrays, meta = padim.state()
    with pytest.raises(ScorerError, match="do not match their recorded shapes"):
        create("padim", PADIM).load_state(arrays | {"mean": arrays["mean"][:, :-1]}, meta)


# --- PaDiM against NumPy ------------------------------------------------------------------------------------------


def test_padim_matches_a_numpy_padim(padim: Padim, case: Case) -> None:
    channels = padim.channels
    assert channels.size == 60 and len(np.unique(channels)) == 60
    x = np.stack([f.reshape(152, -1)[channels].T for f in case.train]).astype(np.float64)  # [N, P, d]
    mean = x.mean(0)
    inv = np.stack([np.linalg.inv(np.cov(x[:, p], rowvar=False) + 0.01 * np.eye(60)) for p in range(x.shape[1])])
    for f in [*case.good, case.defects[0][1]]:
        v = f.reshape(152, -1)[channels].T.astype(np.float64) - mean
        want = np.sqrt(np.einsum("pi,pij,pj->p", v, inv, v))
        patches, score = padim.score(f)
        np.testing.assert_allclose(patches.reshape(-1), want, rtol=2e-3)
        assert score == pytest.approx(want.max(), rel=2e-3)


def test_padim_without_subset_uses_all_channels_and_another_seed_another_subset(case: Case) -> None:
    everything = create("padim", {})
    everything.fit(iter(case.train[:3]), 3)
    np.testing.assert_array_equal(everything.channels, np.arange(152))
    a = create("padim", {"n_features": 20, "seed": 1})
    b = create("padim", {"n_features": 20, "seed": 2})
    a.fit(iter(case.train[:3]), 3)
    b.fit(iter(case.train[:3]), 3)
    assert not np.array_equal(a.channels, b.channels)


# --- valid-area masks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "settings"), [("patchcore", PATCHCORE), ("padim", PADIM)])
def test_patches_outside_the_valid_area_are_ignored(case: Case, kind: str, settings: dict) -> None:
    valid = np.ones((1, 12, 16), bool)
    # The blob (x = 76-92 px, patch columns 9-11) is outside; the stride-16 tap, 3x3-averaged and upsampled,
    # sees about 24 px farther, so the valid area ends 3 columns short of it.
    valid[:, :, 6:] = False
    scorer = fitted(kind, settings, case, valid)
    name, f, _ = case.defects[0]
    assert name == "blob"
    patches, score = scorer.score(f)
    assert (patches[~valid] == 0).all()
    assert score <= max(scorer.score(g)[1] for g in case.good) * 1.2
    reference = fitted(kind, settings, case)  # without the mask the blob stands out
    assert reference.score(f)[1] > score * 1.3


# --- per-position normalisation -------------------------------------------------------------------------------------


def good_norm(scorer, case: Case, valid: np.ndarray | None = None) -> PositionNorm:
    """Position statistics from held-out good images' raw patch maps (exact ones for PatchCore)."""
    source = clone(scorer, candidates="none") if scorer.type == "patchcore" else scorer
    return PositionNorm.fit(np.stack([source.score(f)[0] for f in [*case.good, case.extra[0], case.extra[2]]]), valid)


@pytest.mark.parametrize("reweight", [False, True])
def test_normalised_certified_search_finds_the_exact_normalised_maximum(patchcore: PatchCore, case: Case,
                                                                          reweight: bool) -> None:
    scorer = clone(patchcore, reweight=reweight)
    exact = clone(patchcore, candidates="none", reweight=reweight)
    norm = good_norm(patchcore, case)
    for f in [*case.extra, *(f for _, f, _ in case.defects), case.odd_good]:
        patches, score = scorer.score(f, norm)
        exact_patches, exact_score = exact.score(f, norm)
        top = int(np.argmax(exact_patches))
        assert int(np.argmax(patches)) == top
        assert score == pytest.approx(exact_score, rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(exact_patches, norm.apply(exact.score(f)[0]), rtol=1e-6)
        assert (patches >= exact_patches - 1e-4).all()  # elsewhere upper bounds, as without the norm
        if reweight:
            assert score <= patches.reshape(-1)[top] + 1e-6
        else:
            assert score == pytest.approx(float(patches.max()))


def test_padim_normalised_scores_are_the_normalised_distances(padim: Padim, case: Case) -> None:
    norm = good_norm(padim, case)
    for _, f, _ in case.defects:
        patches, score = padim.score(f, norm)
        np.testing.assert_allclose(patches, norm.apply(padim.score(f)[0]), rtol=1e-6)
        assert score == pytest.approx(float(patches.max()))


@pytest.mark.parametrize(("kind", "settings"), [("patchcore", PATCHCORE), ("padim", PADIM)])
def test_normalised_maximum_stays_inside_the_valid_area(case: Case, kind: str, settings: dict) -> None:
    valid = np.ones((1, 12, 16), bool)
    valid[:, :, 8:] = False
    scorer = fitted(kind, settings, case, valid)
    norm = good_norm(scorer, case, valid)
    for f in [*case.extra, *(f for _, f, _ in case.defects)]:
        patches, _ = scorer.score(f, norm)
        assert valid.reshape(-1)[int(np.argmax(patches))]
        assert (patches[~valid] == patches[valid].min()).all()


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_a_norm_for_another_grid_is_refused(request: pytest.FixtureRequest, case: Case, kind: str) -> None:
    other = PositionNorm(np.zeros((1, 12, 8), np.float32), np.ones((1, 12, 8), np.float32), 5)
    with pytest.raises(ScorerError, match="position norm has 96 positions"):
        request.getfixturevalue(kind).score(case.good[0], other)


# --- configuration and misuse ---------------------------------------------------------------------------------------


def test_registry_has_both_scorers() -> None:
    assert SCORERS["patchcore"] is PatchCore and SCORERS["padim"] is Padim


@pytest.mark.parametrize(
    ("kind", "settings", "message"),
    [
        ("annoy", {}, r"unknown scorer type 'annoy'; available: \['padim', 'patchcore'\]"),
        ("patchcore", {"coreset": 0.1}, r"scorer patchcore: unknown setting\(s\) \['coreset'\]"),
        ("padim", {"n_features": 10, "ridge_": 1}, r"unknown setting\(s\) \['ridge_'\]"),
        ("patchcore", {"coreset_ratio": 0}, r"coreset_ratio must be in \(0, 1\]"),
        ("patchcore", {"coreset_ratio": 1.5}, r"coreset_ratio must be in \(0, 1\]"),
        ("patchcore", {"index": "annoy"}, "patchcore.index must be one of"),
        ("patchcore", {"candidates": "all"}, "patchcore.candidates must be one of"),
        ("patchcore", {"shortlist": 0}, "patchcore.shortlist must be >= 1"),
        ("patchcore", {"projection_dim": 0}, "patchcore.projection_dim must be >= 1"),
        ("patchcore", {"coreset_partitions": 0}, "patchcore.coreset_partitions must be >= 1"),
        ("patchcore", {"nprobe": -1}, "patchcore.nprobe must be >= 1"),
        ("patchcore", {"max_bank": 0}, "patchcore.max_bank must be >= 1 or null"),
        ("patchcore", {"spill_mb": -1}, "patchcore.spill_mb must be >= 0 or null"),
        ("padim", {"n_features": 0}, "padim.n_features must be >= 1 or null"),
        ("padim", {"ridge": 0}, "padim.ridge must be > 0"),
        ("padim", {"ridge": -0.5}, "padim.ridge must be > 0"),
    ],
)
def test_config_errors(kind: str, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create(kind, settings)


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_scoring_before_fit_raises_scorer_error(case: Case, kind: str) -> None:
    scorer = create(kind)
    with pytest.raises(ScorerError, match="used before fit or load"):
        scorer.score(case.good[0])
    if kind == "patchcore":
        with pytest.raises(ScorerError, match="used before fit or load"):
            scorer.add(case.good[0])


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_features_of_another_shape_raise_scorer_error(request: pytest.FixtureRequest, case: Case, kind: str) -> None:
    scorer = request.getfixturevalue(kind)
    with pytest.raises(ScorerError, match=r"features|cannot score"):
        scorer.score(case.good[0][:, :, :6])  # fewer positions
    if kind == "patchcore":
        with pytest.raises(ScorerError, match="do not fit this bank"):
            scorer.score(case.good[0][:, :100])  # fewer channels


def test_fit_errors(case: Case) -> None:
    with pytest.raises(ScorerError, match="no training images"):
        create("patchcore", PATCHCORE).fit(iter([]), 0)
    with pytest.raises(ScorerError, match="at least 2 training images, got 1"):
        create("padim", PADIM).fit(iter(case.train[:1]), 1)
    mixed = [case.train[0], case.train[1][:, :, :6]]
    for kind, settings in (("patchcore", PATCHCORE), ("padim", PADIM)):
        with pytest.raises(ScorerError, match="changed shape"):
            create(kind, settings).fit(iter(mixed), 2)
    with pytest.raises(ScorerError, match="more than the announced 2"):
        create("patchcore", PATCHCORE).fit(iter(case.train[:3]), 2)
    with pytest.raises(ScorerError, match="leaves no patch"):
        create("patchcore", PATCHCORE).fit(iter(case.train[:2]), 2, np.zeros((1, 12, 16), bool))


def test_max_bank_caps_the_coreset(case: Case) -> None:
    scorer = fitted("patchcore", {"coreset_ratio": 1.0, "max_bank": 50}, case)
    assert scorer.bank.shape == (50, 152) and scorer.index.ntotal == 50


# --- coreset partitions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "count", "sizes"),
    [
        ((1, 32, 78), 16, [160] * 7 + [128] + [160] * 7 + [128]),  # bands across the long side
        ((8, 30, 36), 16, [540] * 16),  # two bands per tile
        ((8, 30, 36), 4, [1080] * 8),  # at least one partition per tile
        ((1, 12, 16), 16, [48] * 4),  # no band thinner than 4 patches
        ((1, 40, 10), 4, [100] * 4),  # a portrait grid is cut across its height
        ((1, 12, 16), 1, [192]),
    ],
)
def test_position_partitions_cut_tiles_into_bands(grid: tuple[int, int, int], count: int, sizes: list[int]) -> None:
    parts = position_partitions(grid, count)
    assert parts.shape == (int(np.prod(grid)),)
    assert np.bincount(parts).tolist() == sizes
    t, h, w = grid
    by_tile = parts.reshape(t, h, w)
    for i in range(t):  # partitions never straddle tiles, and are contiguous bands
        assert not set(np.unique(by_tile[i])) & set(np.unique(by_tile[:i]))
        line = by_tile[i, 0] if w >= h else by_tile[i, :, 0]
        assert (np.diff(line) >= 0).all()


def test_partitioned_bank_covers_every_partition_and_keeps_the_search_exact(case: Case) -> None:
    whole = fitted("patchcore", PATCHCORE | {"coreset_partitions": 1}, case)
    split = fitted("patchcore", PATCHCORE | {"coreset_partitions": 4}, case)
    assert split.bank.shape == whole.bank.shape
    # Each bank row is a training patch; under partitions, every band contributes rows.
    train = np.concatenate([f[0].reshape(152, -1).T for f in case.train]).astype(np.float16).astype(np.float32)
    parts = np.tile(position_partitions((1, 12, 16), 4), len(case.train))
    rows = [np.flatnonzero((train == b).all(1))[0] for b in split.bank]
    assert set(parts[rows]) == {0, 1, 2, 3}
    # Restricting each patch to its own band's rows costs little coverage, and the certified
    # search still gives exact image scores.
    assert 0 < split.coverage_radius <= whole.coverage_radius * 1.5  # (greedy in projected space: no strict order)
    exact = clone(split, candidates="none")
    for f in [*case.good, *case.extra]:
        assert split.score(f)[1] == pytest.approx(exact.score(f)[1], rel=1e-5)


def test_patches_spilled_to_a_file_give_the_same_model(case: Case) -> None:
    memory = fitted("patchcore", PATCHCORE | {"spill_mb": None}, case)
    spilled = create("patchcore", PATCHCORE | {"spill_mb": 0})
    stats = spilled.fit(iter(case.train), len(case.train) + 2)  # two announced images never come
    assert stats["spilled"] and stats["images"] == len(case.train)
    np.testing.assert_array_equal(spilled.bank, memory.bank)
    np.testing.assert_array_equal(spilled.shortlist, memory.shortlist)
    assert spilled.coverage_radius == memory.coverage_radius


def test_locality_order_numbers_rows_by_first_use_and_keeps_every_candidate() -> None:
    shortlist = np.array([[4, 2, -1], [2, 0, 4], [5, -1, -1]], np.int32)
    order, remapped = locality_order(shortlist, 7)
    np.testing.assert_array_equal(order, [4, 2, 0, 5, 1, 3, 6])  # first uses, then the unused rows
    np.testing.assert_array_equal(remapped, [[0, 1, -1], [1, 2, 0], [3, -1, -1]])
    np.testing.assert_array_equal(np.where(remapped >= 0, order[np.maximum(remapped, 0)], -1), shortlist)


def test_fitted_bank_is_in_locality_order(patchcore: PatchCore) -> None:
    flat = patchcore.shortlist.reshape(-1)
    _, first = np.unique(flat[flat >= 0], return_index=True)
    assert (np.diff(first) > 0).all()  # row r is first used after row r - 1


# --- learning live (operator feedback) -------------------------------------------------------------------------------


def state_arrays(scorer: PatchCore) -> dict[str, np.ndarray]:
    return scorer.state()[0]


def test_learned_rows_go_into_the_buffers_in_place(patchcore: PatchCore, case: Case) -> None:
    scorer = clone(patchcore)
    bank, graph = scorer.bank, scorer.graph
    growth = scorer.learn_rows(case.odd_good, scorer.coverage_radius)
    n = growth.rows.shape[0]
    assert n > 1 and growth.image_score == scorer.score(case.odd_good)[1]
    scorer.add_rows(growth.rows, growth.positions, (1, 12, 16))
    assert np.shares_memory(scorer.bank, bank) and np.shares_memory(scorer.graph, graph)  # nothing copied
    np.testing.assert_array_equal(scorer.bank[: bank.shape[0]], bank)
    np.testing.assert_array_equal(scorer.bank[bank.shape[0]:], growth.rows.astype(np.float32))
    assert scorer.learned_rows == n and scorer.index.ntotal == scorer.hnsw.ntotal == bank.shape[0] + n
    assert (scorer.graph[bank.shape[0]:, 0] >= 0).all() and scorer.graph.max() < scorer.bank.shape[0]


def test_the_same_rows_give_the_same_state_bit_for_bit_and_rebased_drops_them(patchcore: PatchCore,
                                                                              case: Case) -> None:
    """What forget and replay rely on: more than one HNSW chunk of rows, added twice, then taken away."""
    live, replay = clone(patchcore), clone(patchcore)
    growth = live.learn_rows(case.odd_good, live.coverage_radius * 0.3)
    assert growth.rows.shape[0] > 64  # more than one chunk
    for scorer in (live, replay):
        scorer.add_rows(growth.rows, growth.positions, (1, 12, 16))
    a, b = state_arrays(live), state_arrays(replay)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for f in case.good + case.extra:
        assert live.score(f)[1] == replay.score(f)[1]
    base = live.rebased()
    assert base.learned_rows == 0 and base.bank.shape == patchcore.bank.shape
    for name, value in state_arrays(patchcore).items():
        np.testing.assert_array_equal(state_arrays(base)[name], value, err_msg=name)
    for f in case.good + case.extra + [case.odd_good]:
        assert base.score(f)[1] == patchcore.score(f)[1]


def test_learning_brings_the_normalised_score_below_the_limit_highest_patch_first(patchcore: PatchCore,
                                                                                  case: Case) -> None:
    scorer = clone(patchcore)
    norm = good_norm(scorer, case)
    patches, before = scorer.score(case.odd_good, norm)
    limit = before - 0.5 * (before - float(np.median(patches)))
    growth = scorer.learn_rows(case.odd_good, limit, norm)
    assert growth.image_score == before and growth.rows.shape[0] >= 1
    assert growth.positions[0] == int(np.argmax(patches))  # the highest normalised patch first
    scorer.add_rows(growth.rows, growth.positions, (1, 12, 16))
    assert scorer.score(case.odd_good, norm)[1] < limit
    assert scorer.learn_rows(case.odd_good, limit, norm).rows.shape[0] == 0


def test_learning_past_max_learned_rows_is_refused(patchcore: PatchCore, case: Case) -> None:
    scorer = clone(patchcore, max_learned_rows=3)
    assert scorer.learn_capacity() == 3
    with pytest.raises(ScorerError, match=r"the bank delta is full: .* a rebuild is due"):
        scorer.learn_rows(case.odd_good, scorer.coverage_radius * 0.5, budget=scorer.learn_capacity())
    assert clone(patchcore).learn_capacity() == 1000  # 5 % of this small bank is below the floor
    with pytest.raises(ConfigError, match="max_learned_rows must be >= 0"):
        create("patchcore", PATCHCORE | {"max_learned_rows": -1})


def test_padim_refuses_to_learn_live_and_says_why(padim: Padim, case: Case) -> None:
    for call in (padim.learn_capacity, lambda: padim.learn_rows(case.good[0], 1.0), padim.rebased):
        with pytest.raises(ScorerError, match="PaDiM learns at the next rebuild: it keeps, for every position"):
            call()


def test_row_buffer_appends_in_place_and_doubles_when_full() -> None:
    rows = RowBuffer(np.arange(6, dtype=np.float32).reshape(3, 2), np.float32, 2)
    first = rows.rows
    grown = rows.append(np.full((2, 2), 7, np.float32))
    assert np.shares_memory(first, grown) and grown.shape == (5, 2) and grown.flags.c_contiguous
    bigger = rows.append(np.full((4, 2), 8, np.float32))  # past the room: one copy into twice the buffer
    assert not np.shares_memory(grown, bigger) and bigger.shape == (9, 2)
    np.testing.assert_array_equal(bigger[:5], grown)
    np.testing.assert_array_equal(first, np.arange(6).reshape(3, 2))  # an old view is never changed
