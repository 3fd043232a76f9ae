"""scripts/bench_scan.py: the token-major variant is Mamba's layout, and the report keeps hand-written text."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
bench_scan = pytest.importorskip("bench_scan")


def test_token_major_is_the_same_problem_in_mambas_layout() -> None:
    args = bench_scan.scan_inputs(40, 32)
    u, delta, A, B, C = bench_scan.token_major(*args)
    for moved, original in ((u, args[0]), (delta, args[1])):
        assert moved.shape == original.shape and moved.stride(1) == 1 and torch.equal(moved, original)
    assert B.shape == (1, 1, 16, 40) and torch.equal(B[:, 0], args[3]) and torch.equal(C[:, 0], args[4])
    assert A is args[2]


def test_row_times_the_lane_layout_beside_the_row_kernels() -> None:
    from ssl_med.ops.selective_scan_fused import fused_available, fused_status

    if not fused_available():
        pytest.skip(f"fused CPU kernel unavailable: {fused_status()}")
    torch.manual_seed(0)
    row = bench_scan.scan_row(32, 96, 1, ("fused", "torch"))
    for key in ("fused", "lanes", "torch"):
        assert row[key] > 0 and row[f"{key}_fb"] > 0
        assert row[f"{key}_diff"] < 1e-4
    table = "\n".join(bench_scan.scan_tables([row], ("fused", "torch"), 1))
    assert "fused, token-major (s)" in table and f"| {row['lanes']:.4f} |" in table


def test_torch_only_rows_leave_the_fused_columns_empty() -> None:
    row = {"d": 32, "L": 64, "ref": 0.2, "torch": 0.1, "floor": 0.01, "torch_diff": 1e-6, "torch_fb": 0.3, "ref_fb": 0.9}
    table = bench_scan.scan_tables([row], ("torch",), 1)
    forward = next(line for line in table if line.startswith("| 32 | 64 | 0.2000"))
    assert forward.endswith("| – | – | – |")
    assert any("not measured" in line for line in table)
