"""Short prepared check for a CUDA machine (no internet needed): selective scan, causal conv and Mamba on the GPU.

    scripts/gpu_check.sh [SDIST_DIR]       # builds mamba-ssm's ops from sdists if given, then runs this
    python scripts/gpu_check.py [--out F]  # prints a markdown report; exits 0 without CUDA

1. Selective scan: ``impl="torch"`` vs mamba-ssm's kernel ``impl="cuda"`` on the same inputs
   (float32: outputs, last state and all five input gradients, relative to the kernel's), and the time of
   one forward+backward of each in float32 and bf16. Without the kernel only the torch path is timed.
2. Causal depthwise conv1d: causal-conv1d's kernel vs ``F.conv1d`` (outputs, gradients, time).
3. The Mamba backbone (Vim blocks) with ``scan_impl="cuda"`` and ``"torch"`` on the same weights
   (pooled-output difference) and their forward+backward step times and peak memory next to the ViT of
   equal width and depth, as tokens grow (bf16 autocast).
4. FSDP (``trainer=fsdp``): peak memory per rank and step time of MAE pretraining for ViT-L 2D 224/p16
   and ViT-B 3D 96^3/p8 (1728 tokens), unsharded against sharded per block, with and without activation
   checkpointing (``torchrun --nproc-per-node N scripts/gpu_check.py --sections fsdp`` for N ranks).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_med.ops import selective_scan as scan_ops
from ssl_med.registry import BACKBONES


def _time(fn: Callable[[], object], repeats: int = 10) -> float:
    """Mean seconds per call after two warm-up calls (CUDA events)."""
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _scan_inputs(L: int, d: int = 384, n: int = 16, b: int = 2, dtype: torch.dtype = torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "generator": g}
    tensors = [
        torch.randn(b, d, L, **kw).to(dtype),  # u
        (torch.randn(b, d, L, **kw) * 0.5).to(dtype),  # delta (before bias and softplus)
        -torch.arange(1, n + 1.0, device="cuda").repeat(d, 1),  # A, float32 as in Mamba
        torch.randn(b, n, L, **kw).to(dtype),  # B
        torch.randn(b, n, L, **kw).to(dtype),  # C
    ]
    extras = {"D": torch.ones(d, device="cuda"), "z": torch.randn(b, d, L, **kw).to(dtype),
              "delta_bias": torch.rand(d, **kw) - 4.0}
    return tensors, extras


def _scan_step(impl: str, tensors: list[torch.Tensor], extras: dict):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out, last = scan_ops.selective_scan(
        *leaves, **extras, delta_softplus=True, return_last_state=True, impl=impl  # type: ignore[arg-type]
    )
    # the loss leaves out ``last``: mamba-ssm's backward ignores the last state's gradient (inference-only)
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    return out, last, grads


def scan_section(kernel: bool) -> list[str]:
    lines = [
        "## Selective scan (B=2, D=384, N=16; forward+backward)\n",
        "| L | torch fp32 (ms) | kernel fp32 (ms) | torch bf16 (ms) | kernel bf16 (ms) | kernel speed-up fp32 | "
        "out rel err | last-state rel err | max grad rel err |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for L in (256, 1024, 4096, 16384):
        cells: dict[str, str] = {}
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            tensors, extras = _scan_inputs(L, dtype=dtype)
            for impl in ("torch", "cuda") if kernel else ("torch",):
                seconds = _time(lambda i=impl, t=tensors, e=extras: _scan_step(i, t, e), repeats=5)
                cells[f"{impl}-{tag}"] = f"{seconds * 1e3:.2f}"
        if kernel:
            tensors, extras = _scan_inputs(L)
            o1, l1, g1 = _scan_step("torch", tensors, extras)
            o2, l2, g2 = _scan_step("cuda", tensors, extras)
            speed = float(cells["torch-fp32"]) / float(cells["cuda-fp32"])
            errs = (f"{speed:.1f}x", f"{_rel(o1, o2):.1e}", f"{_rel(l1, l2):.1e}",
                    f"{max(_rel(a, b) for a, b in zip(g1, g2)):.1e}")
        else:
            errs = ("n/a",) * 4
        lines.append(f"| {L} | {cells['torch-fp32']} | {cells.get('cuda-fp32', 'n/a')} | {cells['torch-bf16']} | "
                     f"{cells.get('cuda-bf16', 'n/a')} | " + " | ".join(errs) + " |")
    return lines


def conv_section() -> list[str]:
    kernel = scan_ops._causal_conv1d_kernel()
    lines = ["\n## Causal depthwise conv1d (B=2, D=768, width 4; forward+backward)\n"]
    if kernel is None:
        return [*lines, "causal-conv1d not installed: F.conv1d path only (checked on the CPU by the tests)."]
    lines += ["| L | F.conv1d (ms) | kernel (ms) | out rel err | max grad rel err |", "| ---: | ---: | ---: | ---: | ---: |"]
    for L in (1024, 8192):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(2, 768, L, device="cuda", generator=g)
        w = torch.randn(768, 4, device="cuda", generator=g) * 0.5
        bias = torch.randn(768, device="cuda", generator=g)

        def step(use_kernel: bool, x=x, w=w, bias=bias):
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias)]
            if use_kernel:
                out = kernel(leaves[0], leaves[1], leaves[2], activation="silu")
            else:  # the CPU path of ssl_med.ops.selective_scan.causal_conv1d
                out = F.silu(F.conv1d(F.pad(leaves[0], (3, 0)), leaves[1].unsqueeze(1), leaves[2], groups=768))
            return out, torch.autograd.grad(out.square().sum(), leaves)

        (o1, g1), (o2, g2) = step(False), step(True)
        t_ref, t_kernel = _time(lambda: step(False)), _time(lambda: step(True))
        lines.append(f"| {L} | {t_ref * 1e3:.3f} | {t_kernel * 1e3:.3f} | {_rel(o2, o1):.1e} | "
                     f"{max(_rel(a, b) for a, b in zip(g2, g1)):.1e} |")
    return lines


def _backbone(name: str, dims: int, size: int, patch: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return BACKBONES.build(name, spatial_dims=dims, in_chans=1, img_size=size, patch_size=patch,
                           embed_dim=192, depth=12, **kwargs).cuda()


def _train_step_cell(enc: torch.nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """Seconds of one bf16 forward+backward of ``enc`` on ``x`` (inf when out of memory), and a table cell."""

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = enc(x)
        out.patch_tokens.float().square().mean().backward()

    torch.cuda.reset_peak_memory_stats()
    try:
        seconds = _time(step, repeats=3)
        cell = f"{seconds * 1e3:.1f} ms / {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    except torch.OutOfMemoryError:
        seconds, cell = float("inf"), "out of memory"
    torch.cuda.empty_cache()
    return seconds, cell


def backbone_section(kernel: bool) -> list[str]:
    lines = [
        "\n## Backbone forward+backward (B=2, width 192, depth 12, bf16 autocast)\n",
        "Mamba = Vim blocks (2D: 2 scans, 3D: 3 scans). `diff` = max rel. difference of the pooled output "
        "between the kernel and the torch scan on the same weights.\n",
        "| input | tokens | Mamba, kernel | Mamba, torch scan | ViT (sdpa) | diff |",
        "| --- | ---: | --- | --- | --- | ---: |",
    ]
    for dims, size, patch in ((2, 224, 16), (2, 512, 16), (2, 1024, 16), (3, 96, 8), (3, 128, 8), (3, 160, 8)):
        x = torch.randn(2, 1, *([size] * dims), device="cuda")
        cells, pooled = [], []
        variants = [("mamba", {"scan_impl": "cuda"})] if kernel else []
        variants += [("mamba", {"scan_impl": "torch"}), ("vit", {})]
        for name, kwargs in variants:
            enc = _backbone(name, dims, size, patch, **kwargs)
            if name == "mamba":
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    pooled.append(enc(x).pooled.float())
            cells.append(_train_step_cell(enc, x)[1])
            del enc
        if not kernel:
            cells.insert(0, "n/a")
        diff = f"{_rel(pooled[1], pooled[0]):.1e}" if kernel else "n/a"
        lines.append(f"| {dims}D {size}^{dims} /p{patch} | {(size // patch) ** dims} | {' | '.join(cells)} | {diff} |")
    return lines


def crossover_section(kernel: bool, batch: int = 8) -> list[str]:
    """Mamba (kernel) vs ViT (flash attention) at a training batch size as tokens grow past 8000."""
    if not kernel:
        return ["\nCrossover: needs mamba-ssm's kernel (the torch scan does not fit at these sizes)."]
    lines = [
        f"\n## Crossover: Mamba (kernel) vs ViT (sdpa) forward+backward, B={batch}, width 192, depth 12, bf16\n",
        "| input | tokens | Mamba | ViT | faster |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for dims, size, patch in ((2, 1024, 16), (2, 2048, 16), (3, 128, 8), (3, 192, 8), (3, 256, 8)):
        x = torch.randn(batch, 1, *([size] * dims), device="cuda")
        cells, seconds = [], []
        for name, kwargs in (("mamba", {"scan_impl": "cuda"}), ("vit", {})):
            t, cell = _train_step_cell(_backbone(name, dims, size, patch, **kwargs), x)
            seconds.append(t)
            cells.append(cell)
        faster = "Mamba" if seconds[0] < seconds[1] else "ViT"
        lines.append(f"| {dims}D {size}^{dims} /p{patch} | {(size // patch) ** dims} | {cells[0]} | {cells[1]} | {faster} |")
    return lines


#: FSDP memory cases: name, backbone kwargs, input size, batch per rank
FSDP_CASES = (
    ("ViT-L 2D 224/p16", {"spatial_dims": 2, "size": "large", "img_size": 224, "patch_size": 16}, (224, 224), 32),
    ("ViT-B 3D 96/p8", {"spatial_dims": 3, "size": "base", "img_size": 96, "patch_size": 8}, (96, 96, 96), 2),
)


def _fsdp_row(name: str, backbone: dict, size: tuple[int, ...], batch: int, mode: str) -> str:
    """Peak memory and time of two MAE pretraining steps (AdamW, bf16 autocast) on this rank."""
    from torch.distributed.device_mesh import init_device_mesh

    from ssl_med.build import build_encoder
    from ssl_med.train.run import build_objective
    from ssl_med.train.sharding import mixed_precision, shard_objective

    torch.manual_seed(0)
    encoder = build_encoder({"name": "vit", "in_chans": 1, **backbone})
    obj = build_objective({"name": "mae"}, encoder).cuda()
    if "ac" in mode:
        encoder.set_grad_checkpointing(True)
    if mode.startswith("fsdp"):
        world = torch.distributed.get_world_size()
        shard_objective(obj, init_device_mesh("cuda", (world,)), mixed_precision("bf16-mixed"))
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, *size, device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = obj({"image": x}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    try:
        step()  # the optimiser state exists from here on
        seconds = _time(step, repeats=2)
        cell = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} | {seconds * 1e3:.0f}"
    except torch.OutOfMemoryError:
        cell = "out of memory | -"
    tokens = 1
    for s, p in zip(size, [backbone["patch_size"]] * len(size)):
        tokens *= s // p
    return f"| {name} | {tokens} | {batch} | {mode} | {torch.distributed.get_world_size()} | {cell} |"


def fsdp_section(kernel: bool) -> list[str]:
    """Per-rank GPU memory of MAE pretraining (default 512x8 decoder), unsharded against FSDP2 sharded
    per encoder block with bf16 all-gathers (``trainer=fsdp``), with and without activation
    checkpointing. Alone this is one rank (sharding then saves nothing; it shows the policy's own
    cost); ``torchrun --nproc-per-node N scripts/gpu_check.py --sections fsdp`` gives N ranks."""
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" in os.environ:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    lines = [
        "\n## FSDP: peak memory per rank, MAE step (AdamW, bf16 autocast)\n",
        "`unsharded`: the whole model, gradients and AdamW state on every rank (as DDP); `fsdp`: "
        "`trainer=fsdp` (one FSDP2 unit per encoder/decoder block, bf16 all-gathers, float32 reduce); "
        "`+ac`: `trainer.activation_checkpointing=true`.\n",
        "| model | tokens | batch/rank | mode | ranks | peak GiB/rank | step ms |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, backbone, size, batch in FSDP_CASES:
        for mode in ("unsharded", "unsharded+ac", "fsdp", "fsdp+ac"):
            try:
                lines.append(_fsdp_row(name, backbone, size, batch, mode))
            except Exception as err:  # a report line, not a crash: the other rows still run
                lines.append(f"| {name} | | {batch} | {mode} | | failed: {type(err).__name__}: {str(err)[:120]} | |")
            torch.cuda.empty_cache()
    return lines


SECTIONS = {
    "scan": scan_section,
    "conv": lambda kernel: conv_section(),
    "backbone": backbone_section,
    "crossover": crossover_section,
    "fsdp": fsdp_section,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
    parser.add_argument("--sections", default="scan,conv,backbone,fsdp", help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this on a GPU machine); exiting 0")
        return 0
    kernel = scan_ops.cuda_kernel_available()
    conv = scan_ops._causal_conv1d_kernel() is not None
    report = [
        f"# GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})\n",
        f"mamba-ssm selective-scan kernel: {'yes' if kernel else 'no (torch path only)'}; "
        f"causal-conv1d kernel: {'yes' if conv else 'no'}\n",
    ]
    print("\n".join(report), flush=True)
    for name in args.sections.split(","):
        lines = SECTIONS[name](kernel)
        print("\n".join(lines), flush=True)
        report += lines
    if args.out:
        args.out.write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
