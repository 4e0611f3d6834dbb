"""The ``appliance`` maintenance command line: fit, predict, eval, bundle tools, demo.

Every command loads models through ``bundle.load_bundle`` and reports bad input
(unreadable images, wrong paths, tampered bundles) as one clear line naming the
file. Batch commands go on past a bad file, list it, and say so in their exit code:

* 0: everything asked for was done;
* 1: the command ran, but inputs failed: ``predict`` could not score one or more
  inputs, ``eval`` skipped more than ``MAX_SKIPPED_SHARE`` (5 %) of the test images
  (``fit`` refuses to write a bundle in that case and exits 2);
* 2: the command could not do its job: bad arguments, a missing or unreadable
  dataset or bundle, too few usable images.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import ApplianceError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Visual anomaly detection appliance: fit models, score images, evaluate, manage bundles.")
bundle_app = typer.Typer(no_args_is_help=True, help="Inspect, verify and pack model bundles.")
app.add_typer(bundle_app, name="bundle")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"anomaly-appliance {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                 help="Print the version and exit.")] = False) -> None:
    """Visual anomaly detection appliance: fit models, score images, evaluate, run the inspection daemon."""

SAMPLE_DIR = Path(__file__).resolve().parent / "samples" / "ball_screw"
#: OpenVINO's compiled-model cache for command-line runs (the daemon uses /var/cache/anomaly-appliance).
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anomaly-appliance"


#: Exit codes (see the module docstring).
EXIT_INPUTS_FAILED = 1
EXIT_ERROR = 2


def _fail(exc: BaseException) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(EXIT_ERROR)


def _parse_size(text: str) -> tuple[int, int | None]:
    """``256`` (height, aspect kept) or ``256x640`` (height x width)."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text), None
    except ValueError:
        raise typer.BadParameter(f"size must look like 256 or 256x640, got {text!r}") from None


def _parse_pair(text: str | None, what: str) -> tuple[int, int] | None:
    if text is None:
        return None
    h, w = _parse_size(text)
    if w is None:
        w = h
    return h, w


def _parse_settings(items: list[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON when possible (numbers, true/false, null)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


class _Progress:
    """One progress bar per stage, on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.stage, self.bar, self.done = quiet, None, None, 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if stage != self.stage:
            self.close()
            self.stage, self.done = stage, 0
            self.bar = typer.progressbar(length=total, label=f"{stage:<10}", file=sys.stderr, show_pos=True)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@app.command()
def fit(
    data: Annotated[Path, typer.Argument(help="MVTec category folder (train/good, test/...) or a folder of good images"
                                         )],
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle directory to write")],
    scorer: Annotated[str, typer.Option(help="patchcore or padim")] = "patchcore",
    size: Annotated[str | None, typer.Option(
        help="working size: HEIGHT (aspect ratio kept) or HEIGHTxWIDTH [default: 256; with --tile, the frame's "
             "own height, rounded down to a multiple of 16, so the tiles see it at full resolution]")] = None,
    tile: Annotated[str | None, typer.Option(help="tile size HxW (or N) for tiled inference")] = None,
    overlap: Annotated[int, typer.Option(help="minimum tile overlap, working pixels")] = 32,
    roi: Annotated[str | None, typer.Option(help="crop x,y,w,h in source pixels")] = None,
    valid_mask: Annotated[Path | None, typer.Option(help="PNG mask of the area to inspect (source size)")] = None,
    white_level: Annotated[int | None, typer.Option(help="16-bit value shown as white (e.g. 4095)")] = None,
    frame_convert: Annotated[str, typer.Option(
        help="refuse: the model takes frames of its training images' channels and bit depth (grey or RGB, 8 or "
             "16 bits; they must all be alike) and refuses others; grey: every frame, training and inspected, is "
             "converted to grey first (monochrome lines whose cameras differ)")] = "refuse",
    interpolation: Annotated[str, typer.Option(help="linear (fast) or area (anti-aliased) shrinking")] = "linear",
    resize: Annotated[str, typer.Option(
        help="how frames reach the working size: auto (from the training images' sizes: fixed when they share "
             "one aspect ratio, else stretch), fixed, stretch or letterbox")] = "auto",
    setting: Annotated[list[str], typer.Option("--set", help="scorer setting key=value (repeatable)")] = [],  # noqa: B006
    abnormal: Annotated[Path | None, typer.Option(help="folder layout: folder of defect images")] = None,
    masks: Annotated[Path | None, typer.Option(help="folder layout: masks of the defect images")] = None,
    unknown: Annotated[Path | None, typer.Option(help="folder layout: unlabelled images")] = None,
    calibration_fraction: Annotated[float, typer.Option(help="share of train/good held out to calibrate")] = 0.1,
    target_frr: Annotated[float, typer.Option(help="false-reject rate target without labelled defects")] = 0.01,
    position_norm: Annotated[bool, typer.Option(
        help="normalise patch scores per position over the held-out good images (when there are 20 or more: "
             "FitOptions.position_norm_min_images)")] = True,
    precision: Annotated[str, typer.Option(help="backbone precision f32 or bf16")] = "f32",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all)")] = None,
    cache_dir: Annotated[Path, typer.Option(help="OpenVINO model cache folder")] = DEFAULT_CACHE,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Fit a model on good images and write a verified bundle."""
    from .datasets import load_dataset, load_folder
    from .training import FitOptions
    from .training import fit as run_fit

    height, width = _parse_size(size) if size is not None else (None if tile else 256, None)
    roi_t = None
    if roi:
        try:
            roi_t = tuple(int(v) for v in roi.split(","))
            assert len(roi_t) == 4
        except (ValueError, AssertionError):
            raise typer.BadParameter(f"--roi must be x,y,w,h, got {roi!r}") from None
    progress = _Progress(quiet)
    try:
        if abnormal or masks or unknown:
            dataset = load_folder(data, abnormal_dir=abnormal, mask_dir=masks, unknown_dir=unknown)
        else:
            dataset = load_dataset(data, calibration_fraction=calibration_fraction)
        if not quiet:
            typer.echo(dataset.describe(), err=True)
        options = FitOptions(scorer=scorer, settings=_parse_settings(setting), height=height, width=width,
                             tile=_parse_pair(tile, "tile"), overlap=overlap, roi=roi_t,
                             white_level=white_level, frame_convert=frame_convert, interpolation=interpolation,
                             resize=None if resize == "auto" else resize,
                             valid_mask=str(valid_mask) if valid_mask else None,
                             precision=precision, threads=threads, target_false_reject_rate=target_frr,
                             position_norm=position_norm, cache_dir=str(cache_dir))
        report = run_fit(dataset, out, options, progress, notify=lambda line: typer.echo(line, err=True))
    except ApplianceError as exc:
        progress.close()
        _fail(exc)
    progress.close()
    m = report.engine.manifest
    typer.echo(f"bundle   {report.bundle}  ({m['model_id']})")
    typer.echo(f"fit      {json.dumps(m['training']['fit'])}")
    typer.echo(f"calib    {report.engine.calibration.describe()}")
    typer.echo(f"norm     {m['training']['position_norm']}")
    typer.echo(f"resize   {report.geometry}")
    typer.echo(f"time     {report.seconds['total']:.1f} s   peak RSS {report.peak_rss_mb:.0f} MB")
    for path, reason in report.skipped:
        typer.secho(f"skipped  {path}: {reason}", fg=typer.colors.YELLOW, err=True)


def _collect_inputs(paths: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    from .datasets import list_images
    from .imaging import is_image_file

    files, bad = [], []
    for p in paths:
        if p.is_dir():
            files += list_images(p)
        elif is_image_file(p) or p.is_file():
            files.append(p)
        else:
            bad.append((str(p), "no such file or directory"))
    return files, bad


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="bundle directory or archive")],
    paths: Annotated[list[Path], typer.Argument(help="image files and/or folders")],
    out_dir: Annotated[Path | None, typer.Option(help="write overlay PNGs here")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, json or csv")] = "table",
    output: Annotated[Path | None, typer.Option("--output", help="write the results to this file")] = None,
    threshold: Annotated[float | None, typer.Option(help="normalised threshold (default: bundle's 0.5)")] = None,
    maps: Annotated[bool, typer.Option(help="also save raw anomaly maps (.npy) next to overlays")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all)")] = None,
    cache_dir: Annotated[Path, typer.Option(help="OpenVINO model cache folder")] = DEFAULT_CACHE,
) -> None:
    """Score images: verdicts, scores, overlay PNGs with the result in EXIF; table, JSON or CSV."""
    import numpy as np

    from .bundle import load_bundle
    from .imaging import read_image
    from .overlay import overlay_metadata, render_overlay, save_overlay
    from .reporting import error_record, format_lines, prediction_record, write_csv, write_json
    from .types import Frame

    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter("--format must be table, json or csv")
    try:
        engine = load_bundle(bundle, threads=threads, cache_dir=cache_dir)
        files, bad = _collect_inputs(paths)
    except ApplianceError as exc:
        _fail(exc)
    records: list[dict] = [error_record(p, r) for p, r in bad]

    def frames():  # noqa: ANN202 - generator
        for i, f in enumerate(files):
            try:
                yield Frame(image=read_image(f), seq=i, source=str(f))
            except ApplianceError as exc:
                records.append(error_record(str(f), str(exc)))

    def failed(frame: Frame, exc: ApplianceError) -> None:
        records.append(error_record(frame.source or "?", str(exc)))

    for pred in engine.predict_stream(frames(), threshold=threshold, source="cli", on_error=failed):
        overlay_path = None
        if out_dir is not None:
            stem = Path(pred.frame.source).stem
            amap = engine.anomaly_map(pred.score, frame_shape=pred.frame.image.shape[:2], match_peak=True)
            d = pred.decision
            img = render_overlay(pred.frame.image, amap, score=d.score, threshold=d.threshold, verdict=d.verdict,
                                 model_id=pred.model_id)
            try:
                overlay_path = str(save_overlay(out_dir / f"{stem}_overlay.png", img, overlay_metadata(pred)))
                if maps:
                    np.save(out_dir / f"{stem}_map.npy", engine.anomaly_map(pred.score, normalised=False))
            except (ApplianceError, OSError) as exc:
                records.append(error_record(pred.frame.source, f"overlay not written: {exc}"))
        records.append(prediction_record(pred.frame.source, pred, overlay=overlay_path))
    _emit(records, fmt, output, format_lines, write_json, write_csv)
    failed_inputs = sum(r.get("verdict") == "error" for r in records)
    if failed_inputs:
        typer.secho(f"error: {failed_inputs} of {len(records)} input(s) could not be scored (see the 'error' rows)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_INPUTS_FAILED)
    if not records:
        typer.secho("error: no image files found in the given paths", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_INPUTS_FAILED)


def _emit(records, fmt, output, format_lines, write_json, write_csv) -> None:  # noqa: ANN001
    if fmt == "table":
        text = format_lines(records)
        if output:
            output.write_text(text + "\n")
        else:
            typer.echo(text)
        return
    writer = write_json if fmt == "json" else write_csv
    if output:
        writer(records, output)
    else:
        writer(records, sys.stdout)


@app.command("eval")
def evaluate_cmd(
    bundle: Annotated[Path, typer.Argument(help="bundle directory or archive")],
    data: Annotated[Path, typer.Argument(help="MVTec category folder (its test split is used)")],
    json_out: Annotated[Path | None, typer.Option("--json", help="write the summary and per-image scores")] = None,
    pixel: Annotated[bool, typer.Option(help="compute pixel AUROC and PRO (needs masks)")] = True,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all)")] = None,
    cache_dir: Annotated[Path, typer.Option(help="OpenVINO model cache folder")] = DEFAULT_CACHE,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Image AUROC, pixel AUROC, PRO (FPR <= 0.3) and F1 at the threshold, per defect type."""
    from .bundle import load_bundle
    from .datasets import load_dataset
    from .evaluation import evaluate
    from .training import check_skipped

    progress = _Progress(quiet)
    try:
        engine = load_bundle(bundle, threads=threads, cache_dir=cache_dir)
        dataset = load_dataset(data)
        if not dataset.test:
            raise ApplianceError(f"{data}: no test images to evaluate")
        result = evaluate(engine, dataset.test, pixel=pixel, progress=progress)
    except ApplianceError as exc:
        progress.close()
        _fail(exc)
    progress.close()
    typer.echo(f"model {engine.model_id} on {dataset.name} ({len(result.records)} images, {result.seconds:.1f} s)")
    typer.echo(result.table())
    for path, reason in result.skipped:
        typer.secho(f"skipped  {path}: {reason}", fg=typer.colors.YELLOW, err=True)
    if json_out:
        json_out.write_text(json.dumps({"model_id": engine.model_id, "dataset": str(data),
                                        "summary": result.summary, "images": result.records,
                                        "skipped": result.skipped}, indent=2) + "\n")
    try:
        check_skipped(result.skipped, len(dataset.test), "test images (or their masks)")
    except ApplianceError as exc:
        typer.secho(f"error: {exc}; the figures above do not describe the whole test split", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(EXIT_INPUTS_FAILED) from None


@bundle_app.command("verify")
def bundle_verify(
    bundle: Annotated[Path, typer.Argument(help="bundle directory or archive")],
    golden: Annotated[bool, typer.Option(help="also run the golden-image check (loads the model)")] = True,
) -> None:
    """Verify hashes, manifest and (by default) golden images; exit 2 if anything is wrong."""
    from .bundle import load_bundle, verify_files

    try:
        if golden or bundle.is_file():
            engine = load_bundle(bundle)
            typer.echo(f"ok  {engine.model_id}: files, manifest and {len(engine.manifest['golden'])} golden images")
        else:
            manifest = verify_files(bundle)
            typer.echo(f"ok  {manifest['model_id']}: files and manifest")
    except ApplianceError as exc:
        _fail(exc)


@bundle_app.command("info")
def bundle_info(bundle: Annotated[Path, typer.Argument(help="bundle directory")]) -> None:
    """Print a bundle's manifest summary (no verification of array contents)."""
    from .bundle import read_manifest

    try:
        m = read_manifest(bundle)
    except ApplianceError as exc:
        _fail(exc)
    summary = {k: m[k] for k in ("model_id", "created", "appliance_version", "backbone", "preprocess")}
    summary["scorer"] = {"type": m["scorer"]["type"], "config": m["scorer"]["config"], "meta": m["scorer"]["meta"]}
    summary["calibration"] = m["calibration"]
    summary["position_norm"] = m.get("position_norm")
    summary["training"] = {k: m["training"][k] for k in ("dataset", "images", "fit", "seconds", "peak_rss_mb")}
    summary["bytes"] = sum(f["bytes"] for f in m["files"].values())
    typer.echo(json.dumps(summary, indent=2))


@bundle_app.command("pack")
def bundle_pack(bundle: Annotated[Path, typer.Argument(help="bundle directory")],
                archive: Annotated[Path, typer.Argument(help="archive to write (.tar.gz)")]) -> None:
    """Verify a bundle directory and write it as one archive for transport."""
    from .bundle import pack

    try:
        typer.echo(str(pack(bundle, archive)))
    except ApplianceError as exc:
        _fail(exc)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for the bundle and overlays")] = Path("appliance-demo"),
    data: Annotated[Path, typer.Option(help="sample data (MVTec layout)")] = SAMPLE_DIR,
    scorer: Annotated[str, typer.Option(help="patchcore or padim")] = "patchcore",
) -> None:
    """Fit on the bundled ball-screw sample, then score its test images and print the results."""
    from .datasets import load_dataset

    typer.echo(f"[1/3] fitting {scorer} on {data}", err=True)
    fit(data=data, out=out / "bundle", scorer=scorer, size="256", tile=None, overlap=32, roi=None, valid_mask=None,
        white_level=None, interpolation="linear", resize="auto", setting=[], abnormal=None, masks=None, unknown=None,
        calibration_fraction=0.2, target_frr=0.01, position_norm=True, precision="f32", threads=None,
        cache_dir=out / "cache", quiet=True)
    try:
        test = load_dataset(data).test
    except ApplianceError as exc:
        _fail(exc)
    typer.echo(f"[2/3] scoring {len(test)} test images (overlays in {out / 'overlays'})", err=True)
    predict(bundle=out / "bundle", paths=[s.path for s in test], out_dir=out / "overlays", fmt="table",
            output=None, threshold=None, maps=False, threads=None, cache_dir=out / "cache")
    typer.echo("[3/3] evaluating on the labelled test images", err=True)
    evaluate_cmd(bundle=out / "bundle", data=data, json_out=out / "eval.json", pixel=True, threads=None,
                 cache_dir=out / "cache", quiet=True)


@app.command()
def version() -> None:
    """Print the appliance version."""
    typer.echo(__version__)


def _register_daemon() -> None:
    """The daemon's commands (run, config, status, reload, threshold, trigger, doctor, audit)."""
    from .daemon.cli import register

    register(app)


_register_daemon()


def _register_trainer() -> None:
    """The central trainer's commands (appliance trainer serve, worker, add-appliance, jobs, approve...)."""
    from .trainer.cli import register

    register(app)


_register_trainer()
