"""CPU benchmark: the torch selective scan vs the sequential loop, and Mamba vs ViT as tokens grow.

Writes a markdown report (default ``docs/benchmarks/scan.md``)::

    python scripts/bench_scan.py                      # defaults below, ~10 min on 2 shared cores
    python scripts/bench_scan.py --threads 2 --depth 4 --out /tmp/scan.md

Part 1 times ``selective_scan(impl="torch")`` against ``impl="ref"`` (forward, float32, Mamba's
parametrisation: softplus steps, ``A = -[1..N]``, input-dependent B/C) at ``L = 256 .. 16384`` for a
narrow and a Vim-tiny-wide channel count, with the max abs difference of the outputs.

Part 2 times one forward+backward of the Mamba backbone and of the ViT (``BACKBONES.build("vit")``)
at equal width and depth over growing 2D and 3D inputs, with the peak resident-memory increase of
the step. Every backbone measurement runs in its own subprocess so peak memory is per config.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCAN_LENGTHS = (256, 1024, 4096, 16384)
SCAN_CHANNELS = (32, 384)  # a narrow mixer, and Vim-tiny's d_inner
SIZES_2D = (224, 448, 640, 1024)  # patch 16 -> 196 .. 4096 tokens
SIZES_3D = (64, 96, 128, 160)  # patch 16 -> 64 .. 1000 tokens; patch 8 -> 512 .. 8000


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def scan_inputs(L: int, d: int, n: int = 16, b: int = 1) -> tuple:
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(b, d, L, generator=g), torch.randn(b, d, L, generator=g)
    A = -torch.arange(1, n + 1.0).repeat(d, 1)
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    return u, delta, A, B, C


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def elementwise_floor(u, delta, A, B, C) -> None:
    """The D·L·N work every exact torch implementation does at least once: decays ``exp(delta A)``, drive
    ``delta u B`` and read-out ``<h, C>`` (here on the whole tensors, without any scan)."""
    decay = (delta[..., None] * A[:, None, :]).exp_()
    drive = (delta * u)[..., None] * B.transpose(1, 2)[:, None]
    (drive.mul_(C.transpose(1, 2)[:, None])).sum(-1)
    del decay


def _fwd_bwd(impl: str, args: tuple, kw: dict) -> None:
    from ssl_med.ops.selective_scan import selective_scan

    leaves = [t.clone().requires_grad_() for t in args]
    selective_scan(*leaves, **kw, impl=impl).square().sum().backward()


def scan_row(d: int, L: int, repeats: int) -> dict:
    """Forward (torch, ref, floor) and forward+backward (torch, ref; L <= 4096) times for one size."""
    from ssl_med.ops.selective_scan import selective_scan

    args = scan_inputs(L, d)
    kw = {"D": torch.ones(d), "delta_bias": torch.zeros(d) - 2.0, "delta_softplus": True}
    outs: dict[str, torch.Tensor] = {}

    def forward(impl: str) -> None:
        with torch.no_grad():
            outs[impl] = selective_scan(*args, **kw, impl=impl)

    times = {"torch": _best(lambda: forward("torch"), repeats), "ref": _best(lambda: forward("ref"), 1)}
    with torch.no_grad():
        times["floor"] = _best(lambda: elementwise_floor(*args), repeats)
    if L <= 1024:  # the reference's backward is O(L^2) (each step's select backward fills a full-size gradient)
        times["torch_fb"] = _best(lambda: _fwd_bwd("torch", args, kw), repeats)
        times["ref_fb"] = _best(lambda: _fwd_bwd("ref", args, kw), 1)
    diff = (outs["torch"] - outs["ref"]).abs().max().item()
    return {"d": d, "L": L, **times, "ratio": times["ref"] / times["torch"], "diff": diff}


def bench_scan(repeats: int) -> list[dict]:
    rows = []
    for d in SCAN_CHANNELS:
        for L in SCAN_LENGTHS:
            rows.append(scan_row(d, L, repeats))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def one_step(name: str, dims: int, size: int, patch: int, width: int, depth: int) -> dict:
    """Forward+backward of one backbone on a (1, 1, size^dims) input (run in a subprocess)."""
    from ssl_med.registry import BACKBONES

    torch.manual_seed(0)
    enc = BACKBONES.build(name, spatial_dims=dims, in_chans=1, img_size=size, patch_size=patch,
                          embed_dim=width, depth=depth)
    x = torch.randn(1, 1, *([size] * dims))
    base = _rss_mib()
    _reset_peak()
    t0 = time.perf_counter()
    out = enc(x)
    (out.patch_tokens.square().mean() + out.pooled.square().mean()).backward()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mib": max(_peak_mib() - base, 0.0), "tokens": enc.num_patches([size] * dims)}


def bench_backbones(args: argparse.Namespace) -> list[dict]:
    rows = []
    configs = [(2, s, 16) for s in SIZES_2D] + [(3, s, args.patch_3d) for s in SIZES_3D]
    for dims, size, patch in configs:
        row = {"dims": dims, "size": size, "patch": patch}
        for name in ("mamba", "vit"):
            cmd = [sys.executable, __file__, "--one", json.dumps([name, dims, size, patch, args.width, args.depth]),
                   "--threads", str(args.threads)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.step_timeout, check=True)
                row[name] = json.loads(res.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row[name] = None
            except subprocess.CalledProcessError as err:
                row[name] = None
                print(err.stderr[-2000:], file=sys.stderr)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _fmt(res: dict | None, key: str, spec: str) -> str:
    return "timeout" if res is None else format(res[key], spec)


def report(scan_rows: list[dict], bb_rows: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines = [
        "# Selective scan and Mamba backbone on the CPU",
        "",
        f"Generated by `scripts/bench_scan.py` ({wall / 60:.1f} min) with torch {torch.__version__}, "
        f"{args.threads} intra-op thread(s), on a 2-core machine (absolute times vary ±30 % between runs; "
        "ratios within a row were measured back to back). GPU numbers: [gpu.md](gpu.md).",
        "",
        "## Selective scan: torch (chunked parallel) vs sequential reference",
        "",
        "Float32, batch 1, N = 16, softplus steps, `A = -[1..N]`, input-dependent B/C; torch = best of "
        f"{args.repeats}, ref = one run. `diff` = max abs difference of the outputs. *Floor* = the "
        "D·L·N elementwise work any exact torch implementation must do once (decays `exp(delta A)`, "
        "drive `delta u B`, read-out `<h, C>`), timed on whole tensors without any scan: `ref / floor` "
        "bounds the speed-up a torch-op implementation can reach on this machine.",
        "",
        "| D | L | fwd torch (s) | fwd ref (s) | **fwd speed-up** | floor (s) | ref / floor | fwd+bwd torch (s) "
        "| fwd+bwd ref (s) | **fwd+bwd speed-up** | max abs diff |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in scan_rows:
        fb = (f"{r['torch_fb']:.4f} | {r['ref_fb']:.4f} | {r['ref_fb'] / r['torch_fb']:.1f}x"
              if "torch_fb" in r else "– | – | –")  # fmt: skip
        lines.append(f"| {r['d']} | {r['L']} | {r['torch']:.4f} | {r['ref']:.4f} | {r['ratio']:.1f}x | "
                     f"{r['floor']:.4f} | {r['ref'] / r['floor']:.1f}x | {fb} | {r['diff']:.1e} |")  # fmt: skip
    for d in sorted({r["d"] for r in scan_rows}):
        long = [r for r in scan_rows if r["d"] == d and r["L"] >= 1024]
        if not long:
            continue
        fwd = ", ".join(f"{r['ratio']:.1f}x" for r in long)
        bound = ", ".join(f"{r['ref'] / r['floor']:.1f}x" for r in long)
        cost = ", ".join(f"{r['torch'] / r['floor']:.1f}" for r in long)
        lines += ["", f"D = {d}, L = {', '.join(str(r['L']) for r in long)}: forward speed-up {fwd}; "
                  f"ref / floor {bound}; torch scan = {cost} × floor."]  # fmt: skip
    lines += [
        "",
        "Reading: where `ref / floor` is near 10x (D = 384, Vim-tiny's inner width, and the longest "
        "sequences), a 10x forward speed-up is out of reach for any implementation built from torch "
        "operations on this machine: the sequential loop's per-step operations over (B, D, N) are "
        "already vectorised, so it is bound by the same memory traffic as the unavoidable elementwise "
        "work, not by Python. Where the loop is bound by per-step overhead (narrow D), the torch scan "
        "gets close to or past 10x. The torch scan costs a small multiple of the floor (its scan passes "
        "over the D·L·N states); only a fused kernel (one pass per element, as mamba-ssm's on CUDA, "
        "see gpu.md) would remove that on a CPU.",
    ]
    fb = [r["ref_fb"] / r["torch_fb"] for r in scan_rows if "torch_fb" in r]
    if fb:
        lines.append(
            f"\nWith the backward included (what training runs) the torch scan is {min(fb):.0f}–{max(fb):.0f}x "
            "faster, but that ratio flatters it: autograd through the sequential loop is O(L²) (each step's "
            "slice of the precomputed decays gets a full-size gradient), so it is measured only up to L = 1024."
        )
    lines += [
        "",
        "## Backbone forward+backward: Mamba vs ViT at equal width and depth",
        "",
        f"Width {args.width}, depth {args.depth}, batch 1, one input channel; Mamba = Vim blocks "
        "(2D: raster + reverse scans; 3D: the three SegMamba scans), ViT = timm-style blocks with "
        "the default attention kernel. Time of one forward+backward (first call, includes allocation); "
        "peak = increase of the process's peak resident memory over the step (own subprocess per cell).",
        "",
        "| input | tokens | Mamba (s) | ViT (s) | Mamba peak (MiB) | ViT peak (MiB) | faster |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in bb_rows:
        m, v = r["mamba"], r["vit"]
        tokens = (m or v or {}).get("tokens", "?")
        faster = "?" if m is None or v is None else ("Mamba" if m["seconds"] < v["seconds"] else "ViT")
        shape = "x".join([str(r["size"])] * r["dims"])
        lines.append(
            f"| {shape} /p{r['patch']} | {tokens} | {_fmt(m, 'seconds', '.2f')} | {_fmt(v, 'seconds', '.2f')} | "
            f"{_fmt(m, 'peak_mib', '.0f')} | {_fmt(v, 'peak_mib', '.0f')} | {faster} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--patch-3d", type=int, default=8)
    parser.add_argument("--step-timeout", type=int, default=240)
    parser.add_argument("--skip-backbones", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "scan.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_step(*json.loads(args.one))))
        return
    t0 = time.perf_counter()
    scan_rows = bench_scan(args.repeats)
    bb_rows = [] if args.skip_backbones else bench_backbones(args)
    text = report(scan_rows, bb_rows, args, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
