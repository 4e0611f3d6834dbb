"""Side-by-side benchmark: anomalib 2.7 (torch and its OpenVINO export) against our engine.

One command, one session, same data, same backbone weights, same input size, coreset ratio and k::

    bench/setup_anomalib.sh                       # once: anomalib's own venv (.venv-anomalib)
    .venv/bin/python bench/compare_anomalib.py --data ../shared/data/bsdata/ball_screw \
        --out bench/results/ball_screw --height 256 --width 256 --coreset-ratio 0.01 --k 9

Each fit and each predict runs in its own process (peak RSS per step); both sides fit on the
same training images (ours holds out the rest of train/good for calibration, so the peer is
given exactly our training list). Every number in the report comes from this run: image and
pixel AUROC and PRO from the same metric code on both sides' anomaly maps (resized to mask
resolution), latency (one image at a time, 2 threads), throughput, fit time, peak RSS, size on
disk, and the ratios ours/anomalib. Writes ``report.md``, ``report.json`` and plots into ``--out``.
Steps whose outputs exist are reused unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from machine import describe, one_line  # noqa: E402

from appliance.datasets import load_mvtec  # noqa: E402
from appliance.imaging import read_mask  # noqa: E402
from appliance.metrics import PixelMetrics, image_auroc, roc_curve  # noqa: E402

PEER_PY = REPO / ".venv-anomalib" / "bin" / "python"
OUR_PY = Path(sys.executable)


def run(cmd: list[str], log: Path) -> None:
    """Run a step, teeing its output to a log; stop the benchmark if it fails."""
    print("$", " ".join(map(str, cmd)), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    print(f"  -> {time.perf_counter() - t0:.1f} s (log: {log})", flush=True)
    if proc.returncode:
        raise SystemExit(f"step failed ({proc.returncode}): {' '.join(map(str, cmd))}; see {log}")


def step(out: Path, name: str, cmd: list[str], fresh: bool) -> dict:
    """Run ``cmd`` unless ``out`` already exists; return its JSON."""
    if fresh or not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        run(cmd, out.parent / f"{name}.log")
    return json.loads(out.read_text())


def quality(data: Path, records: list[dict], maps: np.ndarray) -> dict:
    """Image AUROC, pixel AUROC and PRO (FPR <= 0.3), maps bilinearly resized to mask resolution."""
    labels = np.array([r["label"] == "defect" for r in records])
    scores = np.array([r["score"] for r in records], np.float64)
    pixel = PixelMetrics()
    for r, amap in zip(records, maps, strict=True):
        path = data / r["path"]
        mask_path = data / "ground_truth" / r["defect_type"] / f"{path.stem}_mask.png"
        h, w = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[:2]
        mask = read_mask(mask_path, (h, w)) if r["label"] == "defect" and mask_path.exists() else None
        pixel.add(cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), mask)
    fpr, tpr, _ = roc_curve(labels, scores)
    counts = pixel.counts
    return {"image_auroc": round(image_auroc(labels, scores), 4),
            "pixel_auroc": round(pixel.auroc(), 4) if counts.defect_pixels else None,
            "pro": round(pixel.pro(0.3), 4) if counts.defect_pixels else None,
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """Ours / theirs, rounded; None when either is missing."""
    return round(ours / theirs, 4) if ours and theirs else None


def compare_model(args: argparse.Namespace, model: str, train_list: Path) -> dict:
    """Fit and predict one model with both frameworks; collect metrics and resources."""
    base = args.out / model
    base.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(args.data), "--model", model, "--height", str(args.height), "--width", str(args.width),
              "--coreset-ratio", str(args.coreset_ratio), "--k", str(args.k), "--threads", str(args.threads),
              "--train-list", str(train_list)]
    result: dict = {"model": model}
    ours_dir = base / "ours"
    fit_ours = step(ours_dir / "fit.json", "ours_fit",
                    [str(OUR_PY), str(HERE / "ours.py"), "fit", *common, "--workdir", str(ours_dir),
                     *([] if args.position_norm else ["--no-position-norm"])],
                    args.fresh)
    pred_ours = step(ours_dir / "predict_ours.json", "ours_predict",
                     [str(OUR_PY), str(HERE / "ours.py"), "predict", "--data", str(args.data), "--workdir",
                      str(ours_dir), "--threads", str(args.threads), *_max_test(args)], args.fresh)
    result["ours"] = {"fit": fit_ours, "predict": _strip(pred_ours),
                      "quality": quality(args.data, pred_ours["records"], np.load(ours_dir / "maps_ours.npy"))}
    if args.skip_peer:
        return result
    peer_dir = base / "anomalib"
    fit_peer = step(peer_dir / "fit.json", "anomalib_fit",
                    [str(PEER_PY), str(HERE / "peer_anomalib.py"), "fit", *common, "--workdir", str(peer_dir),
                     *(["--coreset", args.peer_coreset] if model == "patchcore" else [])],
                    args.fresh)
    result["anomalib"] = {"fit": fit_peer}
    for runtime in ("torch", "openvino"):
        pred = step(peer_dir / f"predict_{runtime}.json", f"anomalib_predict_{runtime}",
                    [str(PEER_PY), str(HERE / "peer_anomalib.py"), "predict", "--workdir", str(peer_dir), "--data",
                     str(args.data), "--runtime", runtime, "--threads", str(args.threads), *_max_test(args)],
                    args.fresh)
        result["anomalib"][runtime] = {"predict": _strip(pred), "quality": quality(
            args.data, pred["records"], np.load(peer_dir / f"maps_{runtime}.npy"))}
    result["ratios"] = _ratios(result)
    return result


def _max_test(args: argparse.Namespace) -> list[str]:
    return ["--max-test", str(args.max_test)] if args.max_test else []


def _strip(pred: dict) -> dict:
    return {k: v for k, v in pred.items() if k != "records"}


def _ratios(r: dict) -> dict:
    ours, peer = r["ours"], r["anomalib"]
    out = {"fit_time_ours_over_anomalib": ratio(ours["fit"]["fit_seconds"], peer["fit"]["fit_seconds"]),
           "fit_peak_rss_ours_over_anomalib": ratio(ours["fit"]["peak_rss_mb"], peer["fit"]["peak_rss_mb"])}
    for runtime in ("torch", "openvino"):
        p = peer[runtime]["predict"]
        out[f"latency_median_anomalib_{runtime}_over_ours"] = ratio(p["latency"]["median_ms"],
                                                                      ours["predict"]["latency"]["median_ms"])
        out[f"latency_p95_anomalib_{runtime}_over_ours"] = ratio(p["latency"]["p95_ms"],
                                                                   ours["predict"]["latency"]["p95_ms"])
        out[f"throughput_ours_over_anomalib_{runtime}"] = ratio(ours["predict"]["throughput"]["images_per_second"],
                                                                  p["throughput"]["images_per_second"])
        out[f"image_auroc_ours_minus_anomalib_{runtime}"] = round(
            ours["quality"]["image_auroc"] - peer[runtime]["quality"]["image_auroc"], 4)
    return out


def write_train_list(data: Path, out: Path) -> Path:
    """Our training split (train/good minus the calibration hold-out), for the peer to fit on too."""
    ds = load_mvtec(data)
    path = out / "train_list.txt"
    path.write_text("".join(f"{s.path.resolve()}\n" for s in ds.train))
    return path


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    lines = ["# anomalib vs ours", "", f"Machine: {one_line(report['machine'])}", "",
             f"Data: `{report['data']}`; input {report['settings']['height']}x{report['settings']['width']}; "
             f"coreset ratio {report['settings']['coreset_ratio']}, k {report['settings']['k']}; "
             f"{report['settings']['threads']} threads; fit on {report['train_images']} images.", ""]
    for r in report["models"]:
        lines += [f"## {r['model']}", "", "| | image AUROC | pixel AUROC | PRO | latency median / p95 (ms) | "
                  "throughput (img/s) | fit (s) | fit peak RSS (MB) | size on disk (MB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        o = r["ours"]
        size_o = o["fit"]["sizes_bytes"]["bundle"] / 1e6
        lines.append(_row("ours", o["quality"], o["predict"], o["fit"], size_o))
        if "anomalib" in r:
            a = r["anomalib"]
            for rt in ("torch", "openvino"):
                sizes = a["fit"]["sizes_bytes"]
                size = (sizes.get("torch_model", 0) if rt == "torch" else sizes.get("openvino_ir", 0)) / 1e6
                lines.append(_row(f"anomalib {rt}", a[rt]["quality"], a[rt]["predict"], a["fit"], size))
            lines += ["", "Ratios: " + ", ".join(f"{k} **{v}**" for k, v in r["ratios"].items())]
        p = o["predict"]
        lines += ["", f"Our backbone alone (the floor): median {p['backbone_only']['median_ms']} ms, "
                  f"{p['backbone_only']['median_ms'] / p['latency']['median_ms']:.0%} of our per-frame time "
                  f"(scorer median {p['scorer']['median_ms']} ms).", ""]
    return "\n".join(lines) + "\n"


def _row(name: str, q: dict, p: dict, f: dict, size_mb: float) -> str:
    pix = "-" if q["pixel_auroc"] is None else f"{q['pixel_auroc']:.4f}"
    pro = "-" if q["pro"] is None else f"{q['pro']:.4f}"
    return (f"| {name} | {q['image_auroc']:.4f} | {pix} | {pro} | {p['latency']['median_ms']:.1f} / "
            f"{p['latency']['p95_ms']:.1f} | {p['throughput']['images_per_second']:.1f} | {f['fit_seconds']:.1f} | "
            f"{f['peak_rss_mb']:.0f} | {size_mb:.1f} |")


def plot_roc(report: dict, path: Path) -> None:
    """ROC curves of every (model, framework) in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["models"]), figsize=(5 * len(report["models"]), 4.5), squeeze=False)
    for ax, r in zip(axes[0], report["models"], strict=True):
        curves = [("ours", r["ours"]["quality"])]
        if "anomalib" in r:
            curves += [(f"anomalib {rt}", r["anomalib"][rt]["quality"]) for rt in ("torch", "openvino")]
        for name, q in curves:
            ax.plot(q["roc"]["fpr"], q["roc"]["tpr"], label=f"{name} (AUROC {q['image_auroc']:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(title=r["model"], xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    p.add_argument("--out", type=Path, default=HERE / "results" / "compare")
    p.add_argument("--models", nargs="+", default=["patchcore", "padim"])
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--peer-coreset", choices=("fast", "anomalib"), default="fast",
                   help="the peer's coreset selection: the same greedy rule with a pruned kernel (default), or "
                        "anomalib's own KCenterGreedy (hours at a 10 %% coreset; see PEER.md)")
    p.add_argument("--skip-peer", action="store_true", help="only our side (no anomalib venv needed)")
    p.add_argument("--position-norm", action="store_true",
                   help="ours with per-position score normalisation (off by default: like for like with anomalib)")
    p.add_argument("--fresh", action="store_true", help="rerun every step even if its output exists")
    args = p.parse_args()
    args.data, args.out = args.data.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_peer and not PEER_PY.exists():
        raise SystemExit(f"{PEER_PY} not found: run bench/setup_anomalib.sh first (or pass --skip-peer)")
    train_list = write_train_list(args.data, args.out)
    report = {"machine": describe(), "data": str(args.data), "train_images": len(train_list.read_text().split()),
              "settings": {k: getattr(args, k) for k in ("height", "width", "coreset_ratio", "k", "threads")},
              "models": [compare_model(args, m, train_list) for m in args.models]}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    try:
        plot_roc(report, args.out / "roc.png")
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
    print(markdown(report))


if __name__ == "__main__":
    main()
