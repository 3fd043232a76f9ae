"""scripts/bench_mamba_step.py: the scan call it times is Mamba's lane layout, and its table compares labels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
bench_mamba_step = pytest.importorskip("bench_mamba_step")


def test_table_has_one_row_per_label_and_shape_with_the_ratio_to_vit() -> None:
    rows = [
        {"label": label, "shape": "3D", "vit_s": 1.0, "mamba_s": mamba, "scan_fwd_ms": 50.0, "scan_fb_ms": 200.0, "load": 0.1}
        for label, mamba in (("before", 8.0), ("after", 4.0))
    ]
    lines = bench_mamba_step.table(rows).splitlines()
    assert len(lines) == 4
    assert "| before | 3D | 1.00 | 8.00 | 8.0x |" in lines[2]
    assert "| after | 3D | 1.00 | 4.00 | 4.0x |" in lines[3]


def test_scan_call_is_timed_on_the_fused_kernel() -> None:
    from ssl_med.ops.selective_scan_fused import fused_available, fused_status

    if not fused_available():
        pytest.skip(f"fused CPU kernel unavailable: {fused_status()}")
    forward, forward_backward = bench_mamba_step.scan_call_times(batch=2, channels=32, length=9, groups=2, repeats=1)
    assert 0 < forward and 0 < forward_backward
