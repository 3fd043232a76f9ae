"""Short prepared check for a CUDA machine (no internet needed): selective scan and Mamba step on the GPU.

    python scripts/gpu_check.py            # prints a markdown table; exits 0 without CUDA

* With mamba-ssm importable: compares ``selective_scan(impl="torch")`` with mamba-ssm's kernel
  (``impl="cuda"``) on the same inputs (outputs, last state and gradients; float32) and times both.
* Without it: times the torch path on CUDA only.
* Times one forward+backward of a Vim-tiny-wide Mamba backbone (``scan_impl=auto``) and the ViT.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_med.ops.selective_scan import cuda_kernel_available, selective_scan
from ssl_med.registry import BACKBONES


def _time(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _inputs(L: int, d: int = 384, n: int = 16, b: int = 2) -> tuple[list[torch.Tensor], dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "generator": g}
    tensors = [
        torch.randn(b, d, L, **kw),
        torch.randn(b, d, L, **kw) * 0.5,
        -torch.arange(1, n + 1.0, device="cuda").repeat(d, 1),
        torch.randn(b, n, L, **kw),
        torch.randn(b, n, L, **kw),
    ]
    extras = {"D": torch.ones(d, device="cuda"), "z": torch.randn(b, d, L, **kw),
              "delta_bias": torch.rand(d, **kw) - 4.0}
    return tensors, extras


def _run(impl: str, tensors: list[torch.Tensor], extras: dict) -> tuple[torch.Tensor, torch.Tensor, list]:
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out, last = selective_scan(*leaves, **extras, delta_softplus=True, return_last_state=True, impl=impl)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    return out, last, grads


def scan_rows() -> list[str]:
    rows = []
    kernel = cuda_kernel_available()
    for L in (256, 1024, 4096, 16384):
        tensors, extras = _inputs(L)
        t_torch = _time(lambda: _run("torch", tensors, extras))  # noqa: B023
        if kernel:
            t_cuda = _time(lambda: _run("cuda", tensors, extras))  # noqa: B023
            o1, l1, g1 = _run("torch", tensors, extras)
            o2, l2, g2 = _run("cuda", tensors, extras)
            rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()  # noqa: E731
            grad_err = max(rel(a, b) for a, b in zip(g1, g2))
            rows.append(f"| {L} | {t_torch * 1e3:.2f} | {t_cuda * 1e3:.2f} | {t_torch / t_cuda:.1f}x | "
                        f"{rel(o1, o2):.1e} | {rel(l1, l2):.1e} | {grad_err:.1e} |")
        else:
            rows.append(f"| {L} | {t_torch * 1e3:.2f} | n/a | n/a | n/a | n/a | n/a |")
    return rows


def backbone_rows() -> list[str]:
    rows = []
    for dims, size, patch in ((2, 224, 16), (2, 512, 16), (3, 96, 8), (3, 128, 8)):
        cells = []
        for name in ("mamba", "vit"):
            torch.manual_seed(0)
            enc = BACKBONES.build(name, spatial_dims=dims, in_chans=1, img_size=size, patch_size=patch,
                                  embed_dim=192, depth=12).cuda()
            x = torch.randn(2, 1, *([size] * dims), device="cuda")

            def step(enc=enc, x=x) -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = enc(x)
                out.patch_tokens.float().square().mean().backward()

            torch.cuda.reset_peak_memory_stats()
            seconds = _time(step, repeats=3)
            cells.append(f"{seconds * 1e3:.1f} ms / {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
            del enc
        tokens = (size // patch) ** dims
        rows.append(f"| {dims}D {size}^{dims} /p{patch} | {tokens} | {cells[0]} | {cells[1]} |")
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this on a GPU machine); exiting 0")
        return 0
    print(f"# GPU check: {torch.cuda.get_device_name()} , torch {torch.__version__}, "
          f"mamba-ssm kernel: {'yes' if cuda_kernel_available() else 'no (torch path only)'}\n")
    print("| L (B=2, D=384, N=16) | torch fwd+bwd (ms) | mamba-ssm fwd+bwd (ms) | kernel speed-up | "
          "out rel err | last-state rel err | max grad rel err |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(scan_rows()))
    print("\n| backbone step (B=2, width 192, depth 12, bf16 autocast) | tokens | Mamba | ViT |")
    print("| --- | ---: | --- | --- |")
    print("\n".join(backbone_rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
