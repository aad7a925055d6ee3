"""Audits of the field's architectures, and the guaranteed bound of a ResNet-18-sized SLL net.

Part 1 (README table): for each architecture, its claim, the guaranteed upper bound, the
attained lower bound, upper/lower, the verdict and the wall seconds of the Lipschitz audit
(``lipverify.audits.audit`` with ``checks=("lipschitz",)``, 8 lower-bound points).

Part 2 (issue 14 target: under 2 minutes on 2 cores): the guaranteed bound alone (capture +
per-node bounds) of a 1-Lipschitz CIFAR model of ResNet-18 size: 4 stages of widths
64/128/256/512, two SLL residual blocks each, an invertible downsampling
(pixel_unshuffle, an isometry, then a 1x1 conv divided by its exact norm) between stages, and a
linear head divided by its exact norm. The baseline printed in the same run is the
triangle-inequality product of the same graph (every residual ``1 + ||.||``) that the lemma
replaces: ratio = lemma bound / triangle bound.

    python benchmarks/bench_families.py [--threads 2] [--skip-table] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import families as fam  # noqa: E402

from lipverify.audits import audit  # noqa: E402
from lipverify.audits.capture import capture, frozen_parametrizations, release  # noqa: E402
from lipverify.audits.graph import bound_graph  # noqa: E402
from lipverify.audits.lipschitz import eval_mode, layer_upper_bound  # noqa: E402


def _orthogonium_and_torchlip() -> dict:
    out = {}
    try:
        from orthogonium.layers.conv.AOL.aol import AOLConv2D
        from orthogonium.layers.conv.SLL.sll_layer import SDPBasedLipschitzResBlock
        from orthogonium.layers.custom_activations import MaxMin
        from orthogonium.layers.linear import OrthoLinear
        from orthogonium.layers.residual import L2NormResidual
        from orthogonium.model_factory.models_factory import BCOPLargeCNN

        torch.manual_seed(0)
        out["orthogonium BCOPLargeCNN (CIFAR)"] = (BCOPLargeCNN(), (3, 32, 32))
        out["orthogonium SDPBasedLipschitzResBlock"] = (nn.Sequential(
            SDPBasedLipschitzResBlock(8, 2), SDPBasedLipschitzResBlock(8, 2), nn.Flatten(),
            OrthoLinear(8 * 8 * 8, 10)), (8, 8, 8))
        out["orthogonium L2NormResidual(AOL)"] = (nn.Sequential(
            L2NormResidual(nn.Sequential(AOLConv2D(8, 8, 3, padding=1), MaxMin())),
            nn.Flatten(), OrthoLinear(8 * 8 * 8, 10)), (8, 8, 8))
    except ImportError:
        pass
    try:
        from deel.torchlip import GroupSort2, ScaledL2NormPool2d, SpectralConv2d, SpectralLinear

        torch.manual_seed(0)
        out["deel-torchlip Spectral/GroupSort2/L2NormPool"] = (nn.Sequential(
            SpectralConv2d(3, 16, 3, padding=1), GroupSort2(), ScaledL2NormPool2d(2),
            SpectralConv2d(16, 16, 3, padding=1), GroupSort2(), ScaledL2NormPool2d(2),
            nn.Flatten(), SpectralLinear(16 * 8 * 8, 10)), (3, 32, 32))
    except ImportError:
        pass
    return out


def table() -> list[dict]:
    models = {
        "LiResNet-style (3 blocks, power iteration 200)": (fam.liresnet(), (4, 6, 6)),
        "LiResNet-style, stale power iteration (4)": (
            fam.liresnet(iters=4, blocks=1, classes=144), (4, 6, 6)),
        "SLL (2 dense blocks)": (fam.sll(), (3, 4, 4)),
        "SLL, head rescaled x1.05 after training": (fam.sll(1.05, -5.0), (3, 4, 4)),
        "CPL (converged power iteration)": (fam.cpl(), (3, 4, 4)),
        "CPL, unconverged power iteration (12)": (fam.cpl(12, blocks=1, classes=48),
                                                  (3, 4, 4)),
        "AOL (3 layers, MaxMin)": (fam.aol(), (3, 4, 4)),
        "AOL, last layer not normalised": (fam.aol(True), (3, 4, 4)),
        **_orthogonium_and_torchlip(),
    }
    rows = []
    for name, (model, shape) in models.items():
        x = torch.rand(16, *shape, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        rep = audit(model.eval(), x, lipschitz=1.0, checks=("lipschitz",), lipschitz_points=8)
        secs = time.perf_counter() - t0
        up, lo = rep.lipschitz_upper, rep.lipschitz_lower
        rows.append({"model": name, "claim": 1.0, "upper": up, "lower": lo,
                     "ratio": (up / lo) if up and lo else None, "verdict": rep.verdict,
                     "seconds": round(secs, 1)})
        r = rows[-1]
        print(f"| {name} | 1 | {_f(up)} | {_f(lo)} | {_f(r['ratio'])} | {rep.verdict} | "
              f"{secs:.1f} |", flush=True)
    return rows


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.5g}"


# --------------------------------------------------------------------------------------------
# ResNet-18-sized SLL network


class SLLConv(nn.Module):
    """``x - 2 K^T T relu(K x + b)``, ``T`` from the SLL bound on ``|K^T K|`` (conv form)."""

    def __init__(self, c: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.kernel = nn.Parameter(torch.randn(c, c, 3, 3, generator=gen) / (3 * c ** 0.5))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.q = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        ktk = F.conv2d(k, k, padding=2).abs()  # |K^T K| as a 5x5 kernel, summed below
        q = torch.exp(self.q)
        t = 1.0 / (ktk.sum(dim=(2, 3)) * q[None, :] / q[:, None]).sum(1)
        res = t.view(1, -1, 1, 1) * F.relu(F.conv2d(x, k, padding=1) + self.bias)
        return x - 2 * F.conv_transpose2d(res, k, padding=1)


class Down(nn.Module):
    """pixel_unshuffle (an isometry) then a 1x1 conv divided by its exact norm."""

    def __init__(self, c_in: int, c_out: int, seed: int) -> None:
        super().__init__()
        w = torch.randn(c_out, 4 * c_in, generator=torch.Generator().manual_seed(seed))
        w = w / torch.linalg.matrix_norm(w.double(), 2).float()
        self.register_buffer("weight", w.view(c_out, 4 * c_in, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pixel_unshuffle(x, 2), self.weight)


def resnet18_sll() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1, bias=False)]
    with torch.no_grad():
        w = layers[0].weight
        w.div_(float(torch.linalg.matrix_norm(w.flatten(1).double(), 2)) * 3)
    widths = [64, 128, 256, 512]
    for i, c in enumerate(widths):
        layers += [SLLConv(c, 10 * i + 1), SLLConv(c, 10 * i + 2)]
        if i + 1 < len(widths):
            layers.append(Down(c, widths[i + 1], 100 + i))
    head = fam.exact_head(512 * 4 * 4, 10, 5)
    return nn.Sequential(*layers, nn.Flatten(), head)


def resnet_bound() -> dict:
    model = resnet18_sll().eval()
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with eval_mode(model), frozen_parametrizations(), torch.no_grad():
        cap = capture(model, x)
        t_capture = time.perf_counter() - t0
        gb = bound_graph(cap, layer_upper_bound)
        release(cap.handles)
    secs = time.perf_counter() - t0
    lemma_nodes = [nb for nb in gb.nodes if nb.rule.startswith("SDP residual")]
    t1 = time.perf_counter()
    with eval_mode(model), frozen_parametrizations(), torch.no_grad():
        cap = capture(model, x)
        base = bound_graph(cap, layer_upper_bound, lemmas=False)
        release(cap.handles)
    t_base = time.perf_counter() - t1
    triangle = base.upper
    out = {"params": n_params, "seconds_total": round(secs, 1),
           "seconds_capture": round(t_capture, 1), "upper": gb.upper,
           "triangle_upper": triangle, "ratio_vs_triangle": gb.upper / triangle,
           "refusals": gb.refusals, "sll_blocks_by_lemma": len(lemma_nodes),
           "seconds_baseline": round(t_base, 1)}
    print(f"ResNet-18-sized SLL net ({n_params / 1e6:.1f} M parameters): guaranteed bound "
          f"{gb.upper:.6g} in {secs:.1f} s (capture {t_capture:.1f} s); {len(lemma_nodes)} SLL "
          f"blocks by the SDP lemma; op-by-op baseline (lemmas off, same run) {triangle:.4g} in "
          f"{t_base:.1f} s; ratio {gb.upper / triangle:.3g}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"threads": args.threads, "torch": torch.__version__}
    if not args.skip_table:
        print("| model | claim | upper (guaranteed) | lower (attained) | upper/lower | verdict "
              "| seconds |\n|---|---|---|---|---|---|---|")
        result["table"] = table()
    result["resnet18_sll"] = resnet_bound()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    assert math.isfinite(result["resnet18_sll"]["upper"])


if __name__ == "__main__":
    main()
