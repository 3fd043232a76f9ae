"""Forward+backward time and peak memory vs token count: xLSTM (parallel / chunkwise mLSTM) next to ViT.

Usage::

    python scripts/bench_xlstm.py                      # writes docs/benchmarks/xlstm.md
    python scripts/bench_xlstm.py --quick --out /tmp/x.md
    python scripts/bench_xlstm.py --sections reference --reference /path/to/vision-lstm

``--reference`` adds a side-by-side with the reference Vision-LSTM (NX-AI/vision-lstm, ``VisionLSTM2``
from ``vision_lstm/vision_lstm2.py``) at ViL-S width on 2D token grids: the reference is imported from
that checkout in the child processes (it is not part of this package; it needs ``einops``, so run the
script with a Python that has it, e.g. a separate venv made with ``--system-site-packages``). Without
``--reference`` those rows are skipped and a reference section already in the output file is kept as
it is; ``--sections main|reference`` regenerates one section and keeps the other from the file.

Every (model, input) point runs in a fresh subprocess (``--one``), so the peak resident memory of one
point is not hidden by memory the allocator kept from an earlier one: the child builds the model and
input, resets its peak-RSS counter (``/proc/self/clear_refs``), runs ``warmup + repeats`` steps of
forward + ``loss.backward()``, and reports the median time of the ``repeats`` steps and
``peak RSS - RSS before the first step`` (model weights and input excluded; activations, autograd
buffers and workspace included). Same width and
depth for both families; ViT uses its ``math`` attention on CPU unless PyTorch's SDPA picks a fused
kernel (``attn_impl=auto``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_proc import proc_status_mib, run_in_subprocess

if TYPE_CHECKING:  # torch is imported only in the child processes
    from collections.abc import Callable

    from torch import Tensor, nn

    #: (model, input, loss of one step, token count, first single block or None for ViT)
    Built = tuple[nn.Module, Tensor, Callable[[Tensor], Tensor], int, nn.Module | None]

REPO = Path(__file__).resolve().parents[1]

#: (spatial_dims, input side, patch) points; tokens = (side / patch) ** spatial_dims.
POINTS = [(2, 64, 8), (2, 128, 8), (2, 256, 8), (3, 32, 8), (3, 48, 8), (3, 64, 8), (3, 96, 8)]
QUICK_POINTS = [(2, 64, 8), (2, 128, 8), (3, 32, 8), (3, 48, 8)]
MODELS = ["vit", "xlstm-parallel", "xlstm-chunkwise"]

#: Reference comparison: (height, width) inputs at patch 16, i.e. 14x14, 28x28, 32x32, 28x56 tokens.
REFERENCE_INPUTS = [(224, 224), (448, 448), (512, 512), (448, 896)]
QUICK_REFERENCE_INPUTS = [(224, 224), (448, 448)]
REFERENCE_MODELS = ["vil-reference", "xlstm-chunkwise", "xlstm-parallel", "xlstm-auto"]
REFERENCE_PATCH = 16
#: Heading that starts the reference section in the output file (the splice point between sections).
REFERENCE_HEADING = "## Against the reference ViL (NX-AI/vision-lstm)"


def build_ours(spec: dict) -> Built:
    """Our ViT / xLSTM from ``spec`` and its input; the loss reads patch tokens and the pooled embedding."""
    import torch

    from ssl_med.registry import BACKBONES

    shape = spec.get("shape") or [spec["side"]] * spec["spatial_dims"]
    common = {
        "spatial_dims": len(shape),
        "in_chans": spec.get("in_chans", 1),
        "img_size": shape,
        "patch_size": spec["patch"],
        "embed_dim": spec["embed_dim"],
        "depth": spec["depth"],
    }
    if spec["model"] == "vit":
        model = BACKBONES.build("vit", num_heads=max(1, spec["embed_dim"] // 32), **common)
    else:
        impl = spec["model"].split("-", 1)[1]
        model = BACKBONES.build("xlstm", mlstm_impl=impl, chunk_size=spec["chunk_size"], **common)
    x = torch.randn(spec["batch"], common["in_chans"], *shape)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        out = model(inp)
        return out.patch_tokens.square().mean() + out.pooled.square().mean()

    first_block = model.blocks[0] if spec["model"] != "vit" else None
    return model, x, loss, model.num_patches(x.shape[2:]), first_block


def build_reference(spec: dict) -> Built:
    """The reference ``VisionLSTM2`` (features mode, no pooling) imported from ``spec["reference"]``.

    ``spec["depth"]`` counts single blocks as ours does; the reference counts block pairs (one
    forward and one backward block), so it gets ``depth / 2``. The loss is ours: mean square of the
    final-normed tokens plus that of the mean of the first and last token (ViL's ``bilateral_avg``).
    """
    import torch

    sys.path.insert(0, spec["reference"])
    from vision_lstm.vision_lstm2 import VisionLSTM2

    shape = spec["shape"]
    model = VisionLSTM2(
        dim=spec["embed_dim"],
        input_shape=(spec["in_chans"], *shape),
        patch_size=spec["patch"],
        depth=spec["depth"] // 2,
        mode="features",
        pooling=None,
        output_shape=None,
    )
    x = torch.randn(spec["batch"], spec["in_chans"], *shape)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        tokens = model(inp)
        return tokens.square().mean() + ((tokens[:, 0] + tokens[:, -1]) / 2).square().mean()

    return model, x, loss, model.patch_embed.num_patches, model.blocks[0].rowwise_from_top_left


def run_one(spec: dict) -> dict:
    """One point in this process; ``spec``: model, side/shape, patch, embed_dim, depth, batch, ..."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    build = build_reference if spec["model"] == "vil-reference" else build_ours
    model, x, loss, tokens, first_block = build(spec)

    def step() -> None:
        loss(x).backward()
        model.zero_grad(set_to_none=True)

    rss_before = proc_status_mib("VmRSS")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = proc_status_mib("VmHWM")
    block = [] if first_block is None else list(first_block.parameters())
    return {
        **spec,
        "tokens": tokens,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "block_params": sum(p.numel() for p in block) if block else None,
        "block_shapes": sorted(list(p.shape) for p in block),
        "time_s": statistics.median(times),
        "peak_mib": max(peak - rss_before, 0.0),
    }


def run_point(spec: dict, timeout: float) -> dict:
    """:func:`run_one` of ``spec`` in a fresh process (its peak memory is its own); errors keep the spec."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = run_in_subprocess(__file__, spec, timeout, env=env)
    return {**spec, **result} if "error" in result else result


def markdown(results: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines = [
        "# xLSTM (Vision-LSTM) vs ViT: forward+backward cost vs tokens",
        "",
        "Written by `scripts/bench_xlstm.py`. CPU only, "
        f"{args.threads} thread(s) on a machine shared with other jobs ({platform.processor() or platform.machine()}), "
        f"batch {args.batch}, embed_dim {args.embed_dim}, depth {args.depth} (xLSTM: single blocks, "
        f"alternating directions; ViT: {max(1, args.embed_dim // 32)} heads), chunk size {args.chunk_size}, "
        f"median of {args.repeats} steps after {args.warmup} warm-up. Memory = peak RSS during the steps minus "
        "RSS before them (activations + autograd + workspace; weights excluded), per point in a fresh process. "
        f"Total wall time {wall:.0f} s. Absolute numbers are noisy (shared cores); the trends are the point.",
        "",
        "| dims | input | tokens | model | params (M) | fwd+bwd (s) | peak mem (MiB) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        size = "x".join([str(r["side"])] * r["spatial_dims"])
        tokens = (r["side"] // r["patch"]) ** r["spatial_dims"]
        if "error" in r:
            lines.append(f"| {r['spatial_dims']}D | {size} | {tokens} | {r['model']} | | {r['error']} | |")
        else:
            lines.append(
                f"| {r['spatial_dims']}D | {size} | {r['tokens']} | {r['model']} | {r['params_m']:.2f} "
                f"| {r['time_s']:.3f} | {r['peak_mib']:.0f} |"
            )
    lines += [
        "",
        "Notes:",
        "- The parallel mLSTM materialises a (B, 4 heads, L, L) decay/score matrix per block (several",
        "  temporaries in forward and backward), so its memory grows quadratically; the chunkwise form keeps",
        "  (L x chunk) blocks plus one DHxDH state per chunk, linear in L. `mlstm_impl=auto` switches at",
        "  `parallel_max_len` (by default `max(chunk, 2 DH)` tokens, where both forms cost the same on CPU:",
        "  docs/benchmarks/mlstm_forms.md).",
        "- The chunkwise form runs a Python loop over chunks for the state recurrence (cheap elementwise",
        "  ops); at short lengths its overhead makes it slower than the parallel form.",
        "- At equal width a ViL block has about half the weights of a ViT block (~6 D^2: up-projection D->4D,",
        "  down-projection 2D->D; vs 12 D^2), which is why ViL-T stacks 24 blocks where ViT-T has 12.",
    ]
    return "\n".join(lines) + "\n"


def reference_commit(path: str, given: str | None) -> str:
    """The reference checkout's commit: ``given``, else ``git rev-parse HEAD`` there, else ``unknown``."""
    if given:
        return given
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    return "unknown (not a git checkout; pass --reference-commit)"


def reference_problem(path: str | None) -> str | None:
    """Why the reference rows cannot run (``None`` when they can)."""
    if not path:
        return "no --reference /path/to/vision-lstm checkout given"
    if not (Path(path) / "vision_lstm" / "vision_lstm2.py").is_file():
        return f"{path} has no vision_lstm/vision_lstm2.py"
    if importlib.util.find_spec("einops") is None:
        return f"the reference needs einops, which {sys.executable} does not have (use a separate venv)"
    return None


def reference_rows(results: list[dict]) -> list[str]:
    """Table rows, each with its ratio to the reference row at the same input."""
    ref = {tuple(r["shape"]): r for r in results if r["model"] == "vil-reference" and "error" not in r}
    lines = []
    for r in results:
        grid = "x".join(str(n // r["patch"]) for n in r["shape"])
        tokens = math.prod(n // r["patch"] for n in r["shape"])
        if "error" in r:
            lines.append(f"| {tokens} | {grid} | {r['model']} | | {r['error']} | | | |")
            continue
        base = ref.get(tuple(r["shape"]))
        speedup = f"{base['time_s'] / r['time_s']:.2f}x" if base else ""
        mem = f"{r['peak_mib'] / base['peak_mib']:.2f}" if base and base["peak_mib"] > 0 else ""
        lines.append(
            f"| {r['tokens']} | {grid} | {r['model']} | {r['block_params'] / 1e3:.1f} | {r['time_s']:.3f} "
            f"| {speedup} | {r['peak_mib']:.0f} | {mem} |"
        )
    return lines


def speedup_summary(results: list[dict]) -> list[str]:
    """One sentence per token count: the speed-up of ``xlstm-auto`` and the fastest of ours."""
    ref = {r["tokens"]: r for r in results if r["model"] == "vil-reference" and "error" not in r}
    lines = []
    for tokens, base in sorted(ref.items()):
        ours = [r for r in results if r.get("tokens") == tokens and r["model"] != "vil-reference"]
        ours = [r for r in ours if "error" not in r]
        if not ours:
            continue
        auto = next((r for r in ours if r["model"] == "xlstm-auto"), None)
        best = min(ours, key=lambda r: r["time_s"])
        auto_text = f"`xlstm-auto` {base['time_s'] / auto['time_s']:.2f}x, " if auto else ""
        lines.append(
            f"- {tokens} tokens: {auto_text}fastest of ours `{best['model']}` "
            f"{base['time_s'] / best['time_s']:.2f}x the reference's speed."
        )
    return [*lines, ""] if lines else []


def markdown_reference(results: list[dict], args: argparse.Namespace, commit: str, wall: float) -> str:
    """The section comparing ours with the reference ViL (same run, same width, depth and tokens)."""
    from ssl_med.ops.mlstm import auto_parallel_max_len  # torch stays out of the parent until here

    pairs = args.reference_depth // 2
    head_dim = 2 * args.reference_dim // 4  # inner width 2 D over 4 mLSTM heads
    command = " ".join(["python", "scripts/bench_xlstm.py", *args.argv_for_doc])
    lines = [
        REFERENCE_HEADING,
        "",
        f"Reference: NX-AI/vision-lstm at commit `{commit}`, `vision_lstm/vision_lstm2.py` (`VisionLSTM2`, "
        "its default ViL v2 block pair: `ViLBlockPair` with the parallel-form `mLSTM`), imported from a "
        "checkout given on the command line, not vendored. Command (with a Python that has `einops`):",
        "",
        f"    {command}",
        "",
        f"Both at width D = {args.reference_dim}{' (ViL-S; ' if args.reference_dim == 384 else ' ('}inner 2D, "
        f"4 mLSTM heads, 3x3 depthwise grid conv, 4x4 q/k/v blocks), {pairs} block pairs = "
        f"{args.reference_depth} single blocks (depth reduced from ViL-S's 12 pairs so a point takes "
        f"seconds; the ratio is what matters), RGB input, patch {REFERENCE_PATCH}, 2D token grids, batch "
        f"{args.batch}, {args.threads} thread(s). Every point runs in a fresh process as above; one round "
        "runs every model at every input (ours and the reference alternate at each input) and takes the "
        f"median of {args.reference_repeats} forward+backward steps after {args.warmup} warm-up; the table "
        f"shows the fastest of {args.reference_rounds} rounds (noise on shared cores only adds time) and "
        "the highest peak memory. Loss for both: mean square of "
        "the final-normed tokens plus that of the mean of the first and last token. Ours: chunk size "
        f"{args.chunk_size}; `xlstm-auto` is `mlstm_impl=auto` (parallel up to `max(chunk, 2 DH)` tokens, chunkwise beyond). "
        f"Speed-up = reference time / our time; mem ratio = our peak / reference peak. Total wall time "
        f"{wall:.0f} s.",
        "",
        "| tokens | grid | model | params / block (k) | fwd+bwd (s) | speed-up vs ref | peak mem (MiB) "
        "| mem / ref |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *reference_rows(results),
        "",
        *speedup_summary(results),
        "Notes:",
        *block_note(results),
        "- The reference's mLSTM is `parallel_stabilized_simple`: it builds a (B, 4, L+1, L+1) repeated",
        "  cumsum and several (B, 4, L, L) temporaries per block, so its time and memory grow quadratically;",
        "  `xlstm-parallel` is the same algorithm without the repeat and the (L+1)^2 intermediate.",
        "- The reference's causal-mask cache never hits (it tests `S in cache` but stores `(S, device)`",
        "  keys), so it rebuilds an L x L mask per block; this costs little next to the L^2 matmuls.",
        "- `auto` takes the chunkwise form above `max(chunk, 2 DH)` tokens: the chunkwise form's state",
        f"  products cost DH x DV per token (DH = DV = {head_dim} here), so at this width the parallel form",
        f"  stays the faster one up to {auto_parallel_max_len(head_dim, args.chunk_size)} tokens (docs/benchmarks/mlstm_forms.md).",
        "- Above that `xlstm-auto` runs exactly the chunkwise form, so the gap between those two",
        "  rows at long sequences is this run's noise (other jobs share the cores).",
        "- Peak memory includes the activations of what both share (projections, conv, norms), so its",
        "  ratio moves less than the mLSTM's own share does.",
        "- Other differences are outside the blocks: the reference's learned position embedding is a",
        "  (1, h, w, D) grid (ours (1, N, D)); ours flips the sequence in the block, the reference in the layer.",
    ]
    return "\n".join(lines) + "\n"


def best_of_rounds(results: list[dict]) -> list[dict]:
    """One row per (input, model) in first-seen order: the fastest round's time, the highest peak.

    A point that failed in any round is shown with its error.
    """
    rows: dict[tuple, dict] = {}
    for r in results:
        key = (tuple(r["shape"]), r["model"])
        row = rows.get(key)
        if row is None:
            rows[key] = dict(r)
        elif "error" in row:
            continue
        elif "error" in r:
            rows[key] = dict(r)
        else:
            row["time_s"] = min(row["time_s"], r["time_s"])
            row["peak_mib"] = max(row["peak_mib"], r["peak_mib"])
    return list(rows.values())


def reference_specs(args: argparse.Namespace) -> list[dict]:
    """The reference comparison's points: ``--reference-rounds`` rounds, models alternating at each input."""
    specs = []
    for shape in QUICK_REFERENCE_INPUTS if args.quick else REFERENCE_INPUTS:
        for model in REFERENCE_MODELS:
            specs.append(
                {
                    "model": model,
                    "shape": list(shape),
                    "patch": REFERENCE_PATCH,
                    "in_chans": 3,
                    "embed_dim": args.reference_dim,
                    "depth": args.reference_depth,
                    "batch": args.batch,
                    "chunk_size": args.chunk_size,
                    "threads": args.threads,
                    "warmup": args.warmup,
                    "repeats": args.reference_repeats,
                    "reference": str(Path(args.reference).resolve()),
                }
            )
    return specs * args.reference_rounds


def main_specs(args: argparse.Namespace) -> list[dict]:
    """The ViT / xLSTM points of the main table."""
    specs = []
    for spatial_dims, side, patch in QUICK_POINTS if args.quick else POINTS:
        for model in MODELS:
            specs.append(
                {
                    "model": model,
                    "spatial_dims": spatial_dims,
                    "side": side,
                    "patch": patch,
                    "embed_dim": args.embed_dim,
                    "depth": args.depth,
                    "batch": args.batch,
                    "chunk_size": args.chunk_size,
                    "threads": args.threads,
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                }
            )
    return specs


def run_all(specs: list[dict], timeout: float) -> tuple[list[dict], float]:
    """Every point in its own process, in order; returns the results and the wall time."""
    start = time.perf_counter()
    results = []
    for spec in specs:
        result = run_point(spec, timeout)
        results.append(result)
        shown = result.get("error") or f"{result['time_s']:.3f} s, {result['peak_mib']:.0f} MiB"
        where = "x".join(map(str, spec.get("shape") or [spec["side"]] * spec["spatial_dims"]))
        print(f"{where:>12} {spec['model']:<16} {shown}", flush=True)
    return results, time.perf_counter() - start


def split_doc(text: str) -> tuple[str, str]:
    """An existing output file as (main part, reference section); either may be empty."""
    index = text.find(REFERENCE_HEADING)
    if index < 0:
        return text, ""
    return text[:index], text[index:]


def doc_argv(argv: list[str]) -> list[str]:
    """The command-line arguments as the doc shows them: the checkout path is a placeholder."""
    shown, previous = [], ""
    for arg in argv:
        if previous == "--reference":
            shown.append("/path/to/vision-lstm")
        elif arg.startswith("--reference="):
            shown.append("--reference=/path/to/vision-lstm")
        elif not (arg.startswith("--out") or previous == "--out"):
            shown.append(arg)
        previous = arg
    return shown


def block_note(results: list[dict]) -> list[str]:
    """Whether the first single block of every model has the same parameter count and shapes."""
    ok = [r for r in results if "error" not in r]
    counts = sorted({r["block_params"] for r in ok})
    same_shapes = len({json.dumps(r["block_shapes"]) for r in ok}) == 1
    if len(counts) == 1:
        shapes = "same multiset of parameter shapes" if same_shapes else "different parameter shapes"
        return [
            f"- Same block size: every model here has {counts[0]:,} parameters per single block, with the",
            f"  {shapes}. Ours also has a D-wide `mask_token` (MAE/iBOT) outside the",
            "  blocks, unused here.",
        ]
    return [f"- Parameters per single block differ: {', '.join(f'{c:,}' for c in counts)}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "xlstm.md"))
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on shared cores)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per point")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller points")
    parser.add_argument(
        "--sections",
        choices=["all", "main", "reference"],
        default="all",
        help="which sections to regenerate; the others are kept from the output file",
    )
    parser.add_argument("--reference", help="path to a NX-AI/vision-lstm checkout (enables those rows)")
    parser.add_argument("--reference-commit", help="its commit, when the path is not a git checkout")
    parser.add_argument("--reference-dim", type=int, default=384, help="width (ViL-S: 384)")
    parser.add_argument(
        "--reference-depth", type=int, default=4, help="single blocks, even (the reference gets depth/2 pairs)"
    )
    parser.add_argument("--reference-repeats", type=int, default=2)
    parser.add_argument("--reference-rounds", type=int, default=2, help="the table keeps the fastest")
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.reference_depth % 2:
        parser.error("--reference-depth counts single blocks and must be even (the reference has pairs)")
    args.argv_for_doc = doc_argv(argv)
    out = Path(args.out)
    old_main, old_reference = split_doc(out.read_text() if out.is_file() else "")
    main_text, reference_text = old_main, old_reference
    if args.sections in ("all", "main"):
        results, wall = run_all(main_specs(args), args.timeout)
        main_text = markdown(results, args, wall)
    if args.sections in ("all", "reference"):
        problem = reference_problem(args.reference)
        if problem:
            kept = "the existing reference section is kept" if old_reference else "no reference section"
            print(f"reference ViL rows skipped: {problem}; {kept}", flush=True)
        else:
            commit = reference_commit(args.reference, args.reference_commit)
            results, wall = run_all(reference_specs(args), args.timeout)
            results = best_of_rounds(results)
            reference_text = markdown_reference(results, args, commit, wall)
    text = main_text.rstrip("\n") + "\n"
    if reference_text:
        text += "\n" + reference_text
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
