"""Where the chunkwise mLSTM overtakes the parallel one: the crossover behind ``mlstm_impl=auto``.

Times one forward + backward of :func:`ssl_med.ops.mlstm.mlstm_parallel` and
:func:`ssl_med.ops.mlstm.mlstm_chunkwise` on the same random inputs ``(B, NH, L, DH)`` for several head
widths DH and sequence lengths L, and reports, per DH, the shortest L at which the chunkwise form is
faster next to the threshold :func:`ssl_med.ops.mlstm.auto_parallel_max_len` picks for that DH.

Per (DH, L) the two forms alternate within each round; the table keeps the fastest of the rounds
(noise on shared cores only adds time), so the ratio is measured in the same run::

    OMP_NUM_THREADS=1 python scripts/bench_mlstm_forms.py --doc docs/benchmarks/mlstm_forms.md
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from ssl_med.ops.mlstm import auto_parallel_max_len, mlstm_chunkwise, mlstm_parallel


def step_seconds(form: str, b: int, nh: int, length: int, dh: int, chunk_size: int, steps: int) -> float:
    """Median seconds of ``steps`` forward + backward passes of one mLSTM form (after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, nh, length, dh, generator=gen, requires_grad=True) for _ in range(3))
    i_pre, f_pre = (torch.randn(b, nh, length, generator=gen, requires_grad=True) for _ in range(2))

    def once() -> float:
        start = time.perf_counter()
        if form == "parallel":
            h = mlstm_parallel(q, k, v, i_pre, f_pre)
        else:
            h = mlstm_chunkwise(q, k, v, i_pre, f_pre, chunk_size=chunk_size)
        h.square().mean().backward()
        return time.perf_counter() - start

    once()
    times = sorted(once() for _ in range(steps))
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[48, 96, 192])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 96, 128, 160, 196, 256, 324, 400, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args()

    start = time.perf_counter()
    rows, crossover = [], {}
    for dh in args.head_dims:
        for length in args.lengths:
            best = {"parallel": float("inf"), "chunkwise": float("inf")}
            for _ in range(args.rounds):
                for form in best:
                    t = step_seconds(form, args.batch, args.heads, length, dh, args.chunk_size, args.steps)
                    best[form] = min(best[form], t)
            ratio = best["parallel"] / best["chunkwise"]
            if ratio > 1.0 and dh not in crossover:
                crossover[dh] = length
            rows.append((dh, length, best["parallel"], best["chunkwise"], ratio))
            print(f"DH {dh} L {length}: parallel {best['parallel']:.4f}s chunkwise {best['chunkwise']:.4f}s "
                  f"-> chunkwise {ratio:.2f}x", flush=True)

    lines = [
        "# mLSTM forms: parallel against chunkwise",
        "",
        f"Written by `scripts/bench_mlstm_forms.py`. CPU, {torch.get_num_threads()} thread(s), {platform.machine()}, "
        f"batch {args.batch}, {args.heads} heads, chunk size {args.chunk_size}; one forward + backward of the "
        f"cell alone (no projections), median of {args.steps} after a warm-up, fastest of {args.rounds} "
        f"alternating rounds. Total wall time {time.perf_counter() - start:.0f} s.",
        "",
        "| head dim DH | tokens L | parallel s | chunkwise s | chunkwise speed-up |",
        "|---|---|---|---|---|",
        *(f"| {dh} | {n} | {p:.4f} | {c:.4f} | {r:.2f}x |" for dh, n, p, c, r in rows),
        "",
        "| head dim DH | first measured L where chunkwise is faster | `auto` switches above |",
        "|---|---|---|",
        *(
            f"| {dh} | {crossover.get(dh, 'none up to ' + str(max(args.lengths)))} | "
            f"{auto_parallel_max_len(dh, args.chunk_size)} |"
            for dh in args.head_dims
        ),
        "",
        "The parallel form costs about `2 L^2 DH` multiply-adds per head (scores and output); the chunkwise",
        "form `2 L c DH` inside chunks of `c` tokens plus about `2 L DH^2` for the chunk states and the",
        "queries against them, and it keeps every chunk's state for the backward pass. The FLOP count",
        "alone puts the crossover at `c + DH`; `auto` switches at `max(c, 2 DH)`",
        "(`ssl_med.ops.mlstm.auto_parallel_max_len`), unless `parallel_max_len` is set.",
    ]
    text = "\n".join(lines) + "\n"
    if args.doc:
        args.doc.write_text(text)
        print(f"written {args.doc}")
    else:
        print(text)


if __name__ == "__main__":
    main()
