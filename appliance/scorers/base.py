"""The scorer interface and its registry.

A scorer turns patch embeddings ``[T, C, h, w]`` into patch scores ``[T, h, w]``.
It is pure computation (NumPy, Numba, FAISS): no files, no bundles, no cameras.
Its state is a dict of NumPy arrays plus JSON-ready metadata, which the bundle
module stores and verifies.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
from pydantic import ConfigDict, ValidationError

from ..errors import ConfigError, ScorerError
from ..position_norm import PositionNorm

#: Scorer settings are pydantic dataclasses: values from the command line or a manifest are converted
#: to the field's type or refused ("abc" is not a ratio; "no" is False, not a true string).
STRICT = ConfigDict(extra="forbid")

#: Called after each training image with (images done, images total).
Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True, eq=False)
class Growth:
    """What learning one image live takes (``Scorer.learn_rows``).

    Attributes:
        rows: ``[n, C]`` float16 rows to add (``n`` is 0 when the image already scores below the limit).
        positions: ``[n]`` int64 flat patch positions they come from.
        image_score: the image's score before, exactly as ``score`` gives it.

    """

    rows: np.ndarray
    positions: np.ndarray
    image_score: float


class Scorer(ABC):
    """Fit on good images' features, then score patches of new images."""

    #: Registry key, stored in bundles.
    type: ClassVar[str]
    #: The scorer's frozen config dataclass.
    Config: ClassVar[type]
    #: The shipped backbone whose embedding suits this scorer (see ``models/``).
    default_backbone: ClassVar[str]

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def fit(self, features: Iterable[np.ndarray], n_images: int, valid: np.ndarray | None = None,
            progress: Progress | None = None) -> dict:
        """Learn from ``n_images`` feature maps ``[T, C, h, w]`` (float32), streamed one at a time.

        Args:
            features: one ``[T, C, h, w]`` array per training image.
            n_images: how many the iterable yields (to preallocate).
            valid: ``[T, h, w]`` bool, patches inside the valid area (others are ignored).
            progress: optional callback per image.

        Returns:
            Fit statistics for the manifest (timings, sizes).

        """

    @abstractmethod
    def score(self, features: np.ndarray, norm: PositionNorm | None = None, valid: np.ndarray | None = None
              ) -> tuple[np.ndarray, float]:
        """Patch scores ``[T, h, w]`` float32 and the image score (their maximum) for one image's features.

        With ``norm``, both are per-position normalised scores (see ``appliance.position_norm``),
        and the image score is the exact maximum of the normalised patch scores. ``valid``
        (``[T, h, w]`` bool) marks the patches that show this frame (a letterboxed frame's
        padding does not); only they, and only inside the fitted valid area, are scored.
        """

    def patch_scores(self, features: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Raw patch scores ``[T, h, w]`` for statistics over many images (the position norm's).

        Like ``score(features, None, valid)[0]``: every patch's own score as scoring would find it (a
        scorer that bounds its patch scores must tighten them all, not only the maximum); it may skip
        certifying the maximum, since statistics are taken at every position.
        """
        return self.score(features, None, valid)[0]

    @abstractmethod
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays and JSON metadata that fully describe the fitted scorer."""

    @abstractmethod
    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore what ``state`` returned."""

    def warm_up(self, shape: tuple[int, ...]) -> None:  # noqa: B027 - optional hook
        """Run once on dummy features of ``shape`` so no compile or allocation hits the first frame."""

    # ------------------------------------------------------------ learning live (operator feedback)
    #: Why this scorer cannot learn an image live, for the technician who asked it to.
    learning_refusal: ClassVar[str] = ("this model learns at the next rebuild: fit it again with the image among "
                                       "its training images")

    @property
    def learned_rows(self) -> int:
        """Rows learned live since the scorer was fitted or loaded."""
        return 0

    def learn_capacity(self) -> int:
        """Rows that may still be learned live before a rebuild is due.

        Raises:
            ScorerError: the scorer cannot learn live (the default), saying why and what to do.

        """
        raise ScorerError(self.learning_refusal)

    def learn_rows(self, features: np.ndarray, limit: float, norm: PositionNorm | None = None,
                   valid: np.ndarray | None = None, budget: int | None = None) -> Growth:
        """What to add so that the image of ``features`` scores below ``limit`` (on ``score``'s scale); changes nothing.

        Raises:
            ScorerError: more than ``budget`` rows are needed, or the scorer cannot learn live.

        """
        raise ScorerError(self.learning_refusal)

    def add_rows(self, rows: np.ndarray, positions: np.ndarray, grid: tuple[int, int, int]) -> None:
        """Add what ``learn_rows`` returned (now or on replay: the same rows give the same state)."""
        raise ScorerError(self.learning_refusal)

    def rebased(self) -> Scorer:
        """A new scorer with the fitted (or loaded) state alone, nothing learned live."""
        raise ScorerError(self.learning_refusal)

    def reads_beside_scoring(self) -> bool:
        """Whether ``learn_rows`` may run in one thread while ``score`` runs in another."""
        return False


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator adding a scorer to the registry under ``cls.type``."""
    SCORERS[cls.type] = cls
    return cls


def config_from_dict(config_cls: type, data: dict, where: str) -> Any:
    """Build a frozen config dataclass, refusing unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        return config_cls(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))} = {e.get('input')!r}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None


def create(scorer_type: str, settings: dict | None = None) -> Scorer:
    """A new scorer of a registered type, its config built from ``settings``."""
    if scorer_type not in SCORERS:
        raise ConfigError(f"unknown scorer type {scorer_type!r}; available: {sorted(SCORERS)}")
    cls = SCORERS[scorer_type]
    return cls(config_from_dict(cls.Config, settings or {}, f"scorer {scorer_type}"))


def frame_mask(fitted: np.ndarray | None, frame: np.ndarray | None) -> np.ndarray | None:
    """The patches to score in one frame: inside the fitted valid area and showing the frame."""
    if frame is None:
        return fitted
    frame = np.asarray(frame, bool)
    return frame if fitted is None else fitted & frame.reshape(fitted.shape)


def check_norm(norm: PositionNorm | None, grid: tuple[int, ...]) -> None:
    """Refuse a position norm learned for another patch grid ``(T, h, w)``."""
    if norm is not None and norm.mean.shape != tuple(grid):
        raise ScorerError(f"position norm has {norm.mean.size} positions, features {int(np.prod(grid))}")
