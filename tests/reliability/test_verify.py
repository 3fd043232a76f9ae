"""``ssl_med ingest --verify`` reads every chunk and reports each missing, truncated or corrupted one."""

from __future__ import annotations

import json

import pytest

from ssl_med.commands.ingest import run as ingest_command
from ssl_med.data.verify import verify

CT = "images/ct/0"


def test_intact_store_verifies(tiny_store) -> None:
    report = verify(str(tiny_store))
    assert report.ok and report.checked == 6 and not report.warnings, report.summary()


def test_each_bad_chunk_is_reported_by_image_and_key(tiny_store, faults, capsys) -> None:
    files = faults.chunk_files(tiny_store, CT)
    expected = []
    for path, fault in zip(files, ["deleted", "truncated", "emptied", "flipped"]):
        inject, kind = faults.KINDS[fault]
        expected.append(f"ct: chunk {faults.key(tiny_store, CT, path)} of {CT} is {kind}")
        inject(path)
    faults.flip_byte(faults.chunk_files(tiny_store, "stacks/stack")[0])
    report = verify(str(tiny_store))
    assert len(report.problems) == 5, report.summary()
    for line, problem in zip(expected, report.problems):
        assert problem.startswith(line)
    assert report.problems[4].startswith("row0, row1: chunk c/0/0/0/0 of stacks/stack is corrupted")
    assert ingest_command(["--verify", "--out", str(tiny_store)]) == 1
    assert "5 problems" in capsys.readouterr().out


def test_every_chunk_deleted_fails_verify(tiny_store, faults) -> None:
    for array in (CT, "images/photo/0", "stacks/stack"):
        for path in faults.chunk_files(tiny_store, array):
            path.unlink()
    report = verify(str(tiny_store))
    assert not report.ok
    assert {p.split(":")[0] for p in report.problems} == {"ct", "photo", "row0, row1", "row2, row3"}
    assert all(" is missing " in p for p in report.problems if "more bad chunks" not in p)
    assert "ct: 2 more bad chunks in images/ct/0" in report.problems  # 7 chunks: 5 listed, 2 counted


@pytest.mark.parametrize("engine_path", ["direct", "zarr"])
def test_stores_without_inventory_verify_with_a_warning(tiny_store, faults, engine_path) -> None:
    faults.drop_inventories(tiny_store)
    report = verify(str(tiny_store) if engine_path == "direct" else f"file://{tiny_store}")
    assert report.ok and "no chunk inventory" in report.warnings[0], report.summary()


def test_damaged_inventory_is_reported(tiny_store) -> None:
    meta = tiny_store / CT / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["ssl_med_chunks"]["count"] += 1
    meta.write_text(json.dumps(doc))
    report = verify(str(tiny_store))
    assert report.problems == [f"ct: {CT}: chunk inventory damaged: bitmap lists 7 chunks, count says 8"]
