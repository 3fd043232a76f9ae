"""CPU benchmark: one training step's encoder work for Mamba-tiny against ViT-tiny at the in-domain shapes.

The representation benchmark (``scripts/bench_representation.py``) pretrains on 28 px images (patch 4
or 7: 49 or 16 tokens) and 32³ volumes (patch 8: 64 tokens) with batches of 64 crops. At these short
sequences a Mamba step is bound by per-token work that long-sequence benchmarks (``bench_scan.py``)
amortise. This script times one forward+backward of the tiny encoders at exactly those shapes, ViT-tiny
beside Mamba-tiny in the same run as the baseline, and the fused selective-scan call of one Mamba block
alone (forward, and forward+backward)::

    python scripts/bench_mamba_step.py --label "lane kernels" --json docs/benchmarks/mamba_step.json
    python scripts/bench_mamba_step.py --table docs/benchmarks/mamba_step.json   # markdown from every label

``--label`` names the code measured (run it once per checkout to compare two versions of a kernel);
results are appended to ``--json`` and ``--table`` prints one markdown table over every label there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
from bench_proc import best_time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: (name, spatial dims, image size, patch, Mamba scan orders or None for the backbone's default)
SHAPES = (
    ("2D 28 px / p4 (49 tokens)", 2, 28, 4, None),
    ("2D 28 px / p7 (16 tokens)", 2, 28, 7, None),
    ("3D 32³ / p8 (64 tokens), 3 orders", 3, 32, 8, None),
    ("3D 32³ / p8 (64 tokens), 2 orders", 3, 32, 8, ["dhw", "dhw_rev"]),
)


def step_time(encoder: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Best time of ``encoder(x)`` forward + backward of the patch tokens' mean square."""

    def step() -> None:
        encoder(x).patch_tokens.square().mean().backward()

    step()  # warm-up: kernel build, allocator
    return best_time(step, repeats)


def scan_call_times(batch: int, channels: int, length: int, groups: int, repeats: int) -> tuple[float, float]:
    """The fused scan of one Mamba block (Vim-tiny: N = 16, input-dependent B/C, one group per scan
    order): forward alone and forward+backward."""
    from ssl_med.ops.selective_scan import selective_scan

    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, length, channels, generator=g).transpose(1, 2)
    delta = 0.5 * torch.randn(batch, length, channels, generator=g).transpose(1, 2)
    z = torch.randn(batch, length, channels, generator=g).transpose(1, 2)
    A = -torch.arange(1, 17.0).repeat(channels, 1)
    B, C = (torch.randn(batch, groups, 16, length, generator=g) for _ in range(2))
    kw = {"D": torch.ones(channels), "z": z, "delta_bias": torch.zeros(channels) - 2.0, "delta_softplus": True}

    def forward() -> None:
        with torch.no_grad():
            selective_scan(u, delta, A, B, C, **kw, impl="fused")

    def forward_backward() -> None:
        leaf = u.detach().requires_grad_()
        selective_scan(leaf, delta, A, B, C, **kw, impl="fused").square().sum().backward()

    forward_backward()
    return best_time(forward, repeats), best_time(forward_backward, repeats)


def measure(args: argparse.Namespace) -> list[dict]:
    from ssl_med.build import build_encoder
    from ssl_med.ops.selective_scan_fused import fused_status

    torch.set_num_threads(args.threads)
    rows = []
    for name, dims, size, patch, orders in SHAPES:
        x = torch.randn(args.batch, 1, *([size] * dims), generator=torch.Generator().manual_seed(0))
        base = {"spatial_dims": dims, "in_chans": 1, "img_size": size, "patch_size": patch}
        mamba = {"name": "mamba", **base, **({"scan_orders": orders} if orders else {})}
        row = {"label": args.label, "shape": name, "batch": args.batch, "threads": args.threads}
        encoder = build_encoder(mamba)
        row["vit_s"] = step_time(build_encoder({"name": "vit", **base}), x, args.repeats)
        row["mamba_s"] = step_time(encoder, x, args.repeats)
        # one block's scan call: K orders x the mixer's inner width, over the patch and class tokens
        num_orders, inner = len(encoder.scan_orders), encoder.blocks[0].mixer.out_proj.in_features
        tokens = math.prod(encoder.grid_shape(x.shape[2:])) + (encoder.cls_token is not None)
        row["scan_fwd_ms"], row["scan_fb_ms"] = (
            1e3 * t for t in scan_call_times(args.batch, num_orders * inner, tokens, num_orders, args.repeats)
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(), "kernel": fused_status()}
    for row in rows:
        row.update(meta, load=os.getloadavg()[0])
    return rows


TABLE_COLUMNS = [
    "code", "shape", "ViT-tiny fwd+bwd (s)", "Mamba-tiny fwd+bwd (s)", "Mamba / ViT", "scan call fwd (ms)",
    "scan call fwd+bwd (ms)", "load",
]  # fmt: skip


def table(rows: list[dict]) -> str:
    """The markdown table of measured rows, one line per (label, shape)."""
    from ssl_med.evaluators.report import markdown_table

    cells = []
    for r in rows:
        values = (
            r["label"], r["shape"], f"{r['vit_s']:.2f}", f"{r['mamba_s']:.2f}", f"{r['mamba_s'] / r['vit_s']:.1f}x",
            f"{r['scan_fwd_ms']:.0f}", f"{r['scan_fb_ms']:.0f}", f"{r['load']:.1f}",
        )  # fmt: skip
        cells.append(dict(zip(TABLE_COLUMNS, values)))
    return markdown_table(cells, TABLE_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="current", help="name of the code measured (e.g. a commit)")
    parser.add_argument("--json", type=Path, help="append the results to this JSON list")
    parser.add_argument("--table", type=Path, help="print the markdown table of this JSON list and exit")
    parser.add_argument("--batch", type=int, default=64, help="crops per step (the benchmark's batch)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    rows = measure(args)
    if args.json:
        previous = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(previous + rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
