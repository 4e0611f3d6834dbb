"""Our defaults on several datasets, exactly as a user runs them: ``appliance fit`` then ``appliance eval``.

No settings are passed: the resize policy, working size, bank size and calibration are whatever
the engine picks. Each dataset and scorer is one fit and one eval (separate processes); the
report gives image AUROC (and pixel AUROC and PRO where there are masks), fit time, how many
images were skipped, and the resize policy the fit chose and why.

    .venv/bin/python bench/defaults.py --data ../shared/data/bsdata/ball_screw ../shared/data/elpv/poly \
        runs/data/bs_mixed --out bench/results/defaults
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe, one_line  # noqa: E402

APPLIANCE = Path(sys.executable).parent / "appliance"


def run(cmd: list[str], log: Path) -> float:
    """Run one command, log its output; stop if it fails (a default that fails is a finding)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if code:
        raise SystemExit(f"{' '.join(cmd)} exited {code}; see {log}")
    return time.perf_counter() - t0


def one(data: Path, scorer: str, out: Path) -> dict:
    """Fit and evaluate one scorer on one dataset with the defaults."""
    work = out / f"{data.name}-{scorer}"
    work.mkdir(parents=True, exist_ok=True)
    fit_s = run([str(APPLIANCE), "fit", str(data), "--out", str(work / "bundle"), "--scorer", scorer, "-q"],
                work / "fit.log")
    eval_s = run([str(APPLIANCE), "eval", str(work / "bundle"), str(data), "--json", str(work / "eval.json"), "-q"],
                 work / "eval.log")
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    training = manifest["training"]
    summary = json.loads((work / "eval.json").read_text())
    overall = summary["summary"]["overall"]
    return {"data": str(data), "scorer": scorer, "fit_command_s": round(fit_s, 1), "eval_command_s": round(eval_s, 1),
            "fit_s": training["seconds"]["features_and_fit"], "resize": training["resize"],
            "size": manifest["preprocess"]["size"], "fit": training["fit"], "position_norm": training["position_norm"],
            "train_skipped": len(training["skipped"]), "eval_skipped": len(summary["skipped"]),
            "image_auroc": overall.get("image_auroc"), "pixel_auroc": overall.get("pixel_auroc"),
            "pro": overall.get("pro"), "n_good": overall.get("n_good"), "n_defect": overall.get("n_defect")}


def markdown(rows: list[dict], machine: dict) -> str:
    """The results as a Markdown table."""
    lines = [f"Machine: {one_line(machine)}", "",
             "| data | scorer | working size | resize | image AUROC | pixel AUROC | PRO | fit (s) | fit command (s) "
             "| skipped |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda v: "-" if v is None else f"{v:.3f}")  # noqa: E731
        lines.append(f"| {Path(r['data']).name} | {r['scorer']} | {r['size'][0]}x{r['size'][1]} | "
                     f"{r['resize']['policy']} | {fmt(r['image_auroc'])} | {fmt(r['pixel_auroc'])} | {fmt(r['pro'])} | "
                     f"{r['fit_s']:.1f} | {r['fit_command_s']:.1f} | {r['train_skipped']} + {r['eval_skipped']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, nargs="+", required=True, help="MVTec-layout folders")
    p.add_argument("--scorers", nargs="+", default=["patchcore", "padim"])
    p.add_argument("--out", type=Path, default=HERE / "results" / "defaults")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for data in args.data:
        for scorer in args.scorers:
            rows.append(one(data.resolve(), scorer, args.out))
            print(json.dumps(rows[-1]), flush=True)
    machine = describe()
    (args.out / "report.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(rows, machine))
    print(markdown(rows, machine))


if __name__ == "__main__":
    main()
