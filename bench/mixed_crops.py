"""Make a mixed-size copy of an MVTec-layout folder, to check the engine on frames of varying size.

Real lines often deliver crops of a part whose extent varies from crop to crop (a line camera
cut by a trigger, a detector's bounding box). This writes such a dataset from one of fixed
geometry, in the same layout, deterministically:

* ``--mode crop``: each image becomes a grey crop whose width varies by up to ``--spread``
  (widths log-uniform in [W / spread, W]) and whose height varies by up to 20 %; a defect
  image's crop always contains its whole mask, and the mask is cropped with it;
* ``--mode scale``: each image is resized to a random size (width and height each log-uniform
  over a factor ``--spread``): the same content, stretched differently;
* ``--mode resize --size HxW``: every image stretched to one size (as anomalib's pre-processing
  does), so that two frameworks can be compared on identical pixels.

    .venv/bin/python bench/mixed_crops.py --data ../shared/data/bsdata/ball_screw --out runs/data/bs_mixed
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import cv2
import numpy as np


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _crop_box(rng: random.Random, shape: tuple[int, int], spread: float, mask: np.ndarray | None
              ) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of a crop; it contains every mask pixel when there is a mask."""
    h, w = shape
    cw = round(_log_uniform(rng, w / spread, w))
    ch = round(rng.uniform(0.8, 1.0) * h)
    if mask is not None and mask.any():
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        cw, ch = max(cw, x1 - x0), max(ch, y1 - y0)
        x = rng.randint(max(0, x1 - cw), min(x0, w - cw))
        y = rng.randint(max(0, y1 - ch), min(y0, h - ch))
    else:
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return x, y, cw, ch


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def convert(data: Path, out: Path, mode: str, spread: float, seed: int, size: tuple[int, int] | None = None) -> int:
    """Write the mixed-size copy; returns the number of images written."""
    rng = random.Random(seed)
    count = 0
    for split_dir in sorted(p for p in (data / "train", data / "test") if p.is_dir()):
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            gt = data / "ground_truth" / folder.name
            for path in _images(folder):
                image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                mask_path = gt / f"{path.stem}_mask.png"
                mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) if mask_path.exists() else None
                if mode == "crop":
                    x, y, cw, ch = _crop_box(rng, image.shape[:2], spread, mask)
                    image = _grey(image[y : y + ch, x : x + cw])
                    mask = None if mask is None else mask[y : y + ch, x : x + cw]
                elif mode == "resize":
                    assert size is not None, "--mode resize needs --size HxW"
                    image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA)
                    mask = None if mask is None else cv2.resize(mask, size[::-1], interpolation=cv2.INTER_NEAREST)
                else:
                    h, w = image.shape[:2]
                    size = (round(w * _log_uniform(rng, 1 / math.sqrt(spread), math.sqrt(spread))),
                            round(h * _log_uniform(rng, 1 / math.sqrt(spread), math.sqrt(spread))))
                    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                    mask = None if mask is None else cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
                target = out / split_dir.name / folder.name / f"{path.stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(target), image)
                if mask is not None:
                    mask_target = out / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                    mask_target.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(mask_target), (mask > 0).astype(np.uint8) * 255)
                count += 1
    return count


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=("crop", "scale", "resize"), default="crop")
    p.add_argument("--size", default=None, help="HxW for --mode resize")
    p.add_argument("--spread", type=float, default=6.0, help="largest over smallest width")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    n = convert(args.data, args.out, args.mode, args.spread, args.seed, size)
    print(f"{n} images written to {args.out}")


if __name__ == "__main__":
    main()
