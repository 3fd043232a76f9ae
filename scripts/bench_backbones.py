"""Forward+backward throughput and peak memory of the registered backbones vs token count.

For every backbone in ``BACKBONES.names()`` at one width/depth, on growing 2D and 3D inputs (patch 16):
ViT and ChAda-ViT once per available attention kernel (``sdpa``, ``math``, and ``xformers`` on CUDA
when installed), ChAda-ViT at a few channel counts (sequence = channels x patches), the other
backbones (Mamba, xLSTM, ...) with their default kernels. Writes a markdown table::

    python scripts/bench_backbones.py                       # CPU defaults: a few minutes on 2 cores
    python scripts/bench_backbones.py --sizes-2d 224 384 512 --sizes-3d 64 96 128 --depth 12 \\
        --device cuda --out docs/benchmarks/backbones_cuda.md

Measurement: one warm-up step, then steps are repeated until ``--min-time`` seconds (at most
``--max-iters``); reported is the median step time of ``forward -> (pooled^2 + patch_tokens^2).mean()
-> backward`` with batch ``--batch``. Peak memory: on CUDA ``max_memory_allocated`` over the timed
steps; on the CPU the rise of the process's peak resident set (``VmHWM``, reset per cell through
``/proc/self/clear_refs``) over the resident set before the cell. A backbone whose step exceeds
``--slow-step`` seconds is not run at larger sizes of that dimensionality (marked ``skipped``).
The tensors autograd saves for the backward pass are summed exactly in every cell (activation memory,
unaffected by other processes). On the CPU the default is one intra-op thread: on a shared machine
two OpenMP threads spend most of their time waiting for each other (a 4-token step took 0.7 s with
2 threads under load, 15 ms with 1). ``--json`` also writes the raw rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_proc import proc_status_mib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_med.registry import BACKBONES  # noqa: E402

ATTENTION_BACKBONES = {"vit", "chada_vit"}
CHANNEL_ADAPTIVE = {"chada_vit"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def attention_impls(device: torch.device) -> list[str]:
    impls = ["sdpa", "math"]
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("xformers") is not None:
            impls.append("xformers")
    return impls


def build(name: str, dims: int, size: int, args: argparse.Namespace, impl: str | None, channels: int):
    kwargs = {
        "spatial_dims": dims,
        "img_size": size,
        "patch_size": args.patch,
        "embed_dim": args.width,
        "depth": args.depth,
    }
    if name not in CHANNEL_ADAPTIVE:
        kwargs["in_chans"] = channels
    if name in ATTENTION_BACKBONES:
        kwargs["num_heads"] = args.heads
        kwargs["attn_impl"] = impl
    torch.manual_seed(0)
    enc = BACKBONES.build(name, **kwargs)
    enc.set_grad_checkpointing(getattr(args, "grad_checkpointing", False))
    return enc


def measure(
    name: str, dims: int, size: int, args: argparse.Namespace, impl: str | None, channels: int
) -> dict:
    device = torch.device(args.device)
    enc = build(name, dims, size, args, impl, channels).to(device).train()
    x = torch.randn(args.batch, channels, *([size] * dims), device=device)
    patches = enc.num_patches([size] * dims)
    seq = patches * (channels if name in CHANNEL_ADAPTIVE else 1)

    def step() -> None:
        enc.zero_grad(set_to_none=True)
        out = enc(x)
        (out.pooled.square().mean() + out.patch_tokens.square().mean()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    gc.collect()
    base = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    else:
        _reset_peak()
    saved = saved_activations_mib(enc, x)  # also the warm-up step
    times: list[float] = []
    cpu_times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < args.max_iters and (not times or time.perf_counter() - t_start < args.min_time):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - mem0) / 2**20
    else:
        peak = max(proc_status_mib() - base, 0.0)
    sec = statistics.median(times)
    gc.collect()
    return {
        "seconds": sec,
        "samples_s": args.batch / sec,
        "tokens_s": args.batch * seq / sec,
        "peak_mib": peak,
        "saved_mib": saved,
        "cpu_seconds": statistics.median(cpu_times),
        "patches": patches,
        "seq": seq,
        "iters": len(times),
    }


def saved_activations_mib(enc: torch.nn.Module, x: torch.Tensor) -> float:
    """One forward+backward step; returns the size of the tensors autograd saved for the backward pass
    (unique storages, parameters excluded): the activation memory, independent of allocator caching
    and of other processes."""
    params = {p.untyped_storage().data_ptr() for p in enc.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    enc.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = enc(x)
        loss = out.pooled.square().mean() + out.patch_tokens.square().mean()
    loss.backward()
    return sum(storages.values()) / 2**20


def configs(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str | None, int]]:
    """(backbone, attention impl or None, channels) rows, in table order."""
    names = args.backbones or BACKBONES.names()
    rows: list[tuple[str, str | None, int]] = []
    for name in names:
        if name in CHANNEL_ADAPTIVE:
            rows += [(name, impl, c) for c in args.chada_channels for impl in attention_impls(device)]
        elif name in ATTENTION_BACKBONES:
            rows += [(name, impl, 1) for impl in attention_impls(device)]
        else:
            rows.append((name, None, 1))
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    results = []
    for name, impl, channels in configs(args, device):
        for dims, sizes in ((2, args.sizes_2d), (3, args.sizes_3d)):
            too_slow = False
            for size in sizes:
                row = {
                    "name": name,
                    "impl": impl or "default",
                    "channels": channels,
                    "dims": dims,
                    "size": size,
                }
                if too_slow:
                    row["skipped"] = True
                else:
                    try:
                        row |= measure(name, dims, size, args, impl, channels)
                        too_slow = row["seconds"] > args.slow_step
                    except (RuntimeError, ValueError, ImportError) as err:  # OOM, unsupported kernel
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
                results.append(row)
                print(_line(row), flush=True)
    return results


def _line(r: dict) -> str:
    shape = "x".join([str(r["size"])] * r["dims"])
    head = f"| {r['name']} | {r['impl']} | {r['channels']} | {shape} |"
    if r.get("skipped"):
        return head + " | skipped (a smaller size was too slow) | | | | | |"
    if "error" in r:
        return head + f" | {r['error']} | | | | | |"
    return (
        head
        + f" {r['seq']} | {r['seconds'] * 1e3:.0f} | {r['cpu_seconds'] * 1e3:.0f} | {r['samples_s']:.2f} | "
        f"{r['tokens_s']:.0f} | {r['saved_mib']:.1f} | {r['peak_mib']:.0f} |"
    )


def report(rows: list[dict], args: argparse.Namespace, wall: float) -> str:
    device = torch.device(args.device)
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    )
    lines = [
        "# Backbones: forward+backward throughput and peak memory vs token count",
        "",
        f"Generated by `scripts/bench_backbones.py` in {wall / 60:.1f} min on {where} "
        f"({args.device}, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)). "
        f"Width {args.width}, depth {args.depth}, {args.heads} heads for the attention models, patch "
        f"{args.patch}, batch {args.batch}, float32, training mode.",
        "",
        "Median step time (wall clock, and CPU time of the process summed over its threads) of forward + "
        f"loss + backward over up to {args.max_iters} steps (at least {args.min_time:.0f} s) after one warm-up "
        "step; samples/s and tokens/s from the wall time. "
        "`tokens` = length of the token sequence without prefix tokens (ChAda-ViT: channels x patches). "
        + "Saved activations = tensors autograd keeps for the backward pass (unique storages, parameters "
        "excluded), measured exactly per step. "
        + (
            "Peak = CUDA `max_memory_allocated` over the steps, above the memory held before."
            if device.type == "cuda"
            else "Peak = rise of the process's peak resident memory (VmHWM) during the cell, over the "
            "resident memory before it; it is 0 or small whenever the allocator reuses memory freed by an "
            "earlier cell, so on the CPU read the saved-activations column."
        ),
        "",
        "| backbone | attention | channels | input | tokens | fwd+bwd wall (ms) | CPU time (ms) | samples/s "
        "| tokens/s | saved activations (MiB) | peak (MiB) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    # grouped by input (equal token counts next to each other), then backbone, kernel, channels
    order = sorted(rows, key=lambda r: (r["dims"], r["size"], r["name"], r["channels"], r["impl"]))
    lines += [_line(r) for r in order]
    lines += [
        "",
        "Notes:",
        "",
        f"- Depth {args.depth} (not 12) so that the whole table finishes in minutes on a shared CPU; step "
        "time and activation memory grow about linearly with depth, so compare rows, not absolute values.",
        "- On a shared machine the wall time includes waiting for other processes; the CPU time of the "
        "process is the steadier measure of work.",
        "- ChAda-ViT attends over channels x patches tokens: at C channels its sequence is C times a ViT's "
        "on the same input, and attention cost grows with its square.",
        "- `math` materialises the (heads x L x L) attention matrix and keeps it for the backward pass; "
        "`sdpa` on the CPU uses a fused kernel that keeps only per-row statistics (see saved activations).",
        "- Packing (xformers `BlockDiagonalMask`) for ChAda-ViT batches with different channel counts "
        "needs CUDA with xformers and is not measured here; on the CPU batches with missing channels use "
        "a key-padding mask.",
        "- Other backbones use their default kernels (Mamba: the chunked torch selective scan without "
        "mamba-ssm; xLSTM: the parallel / chunkwise mLSTM chosen by `mlstm_impl=auto`).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sizes-2d", type=int, nargs="*", default=[224, 384, 512])
    parser.add_argument("--sizes-3d", type=int, nargs="*", default=[64, 96, 128])
    parser.add_argument("--chada-channels", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--backbones", nargs="*", default=None, help="default: all registered")
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--max-iters", type=int, default=5)
    parser.add_argument("--slow-step", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "backbones.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.patch <= 0 or any(s % args.patch for s in args.sizes_2d + args.sizes_3d):
        parser.error(f"every size must be a multiple of the patch {args.patch}")
    t0 = time.perf_counter()
    rows = run(args)
    text = report(rows, args, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out} ({math.ceil(time.perf_counter() - t0)} s)")


if __name__ == "__main__":
    main()
