"""Stores on object storage: ingest into and train crops from a real S3 API served on loopback (moto)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "ssl-med-test"


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random port) with an empty bucket; AWS_* env points at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        server.stop()


def test_ingest_to_s3_and_train_crops_from_it(s3: str, tmp_path: Path) -> None:
    from ssl_med.data.crops import RandomCropDataset
    from ssl_med.data.ingest import ingest
    from ssl_med.data.store import ImageStore

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 1000, size=(40, 36, 30)).astype(np.int16)  # (X, Y, Z) as NIfTI stores it
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "case.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")

    url = f"{s3}/ct.zarr"
    report = ingest([str(tmp_path / "case.nii.gz"), str(tmp_path / "broken.nii.gz")], url, progress=False, log=lambda _: None)
    assert [r for r, _ in report.skipped] and "broken" in report.skipped[0][0]
    store = ImageStore(url)
    assert list(store.manifest) == ["case"]
    meta = store.manifest["case"]
    assert meta.shape[1:] == (30, 36, 40)  # (C, Z, Y, X) after reorientation to RAS
    full = store.read("case")
    np.testing.assert_array_equal(np.sort(full.ravel()), np.sort(volume.ravel()))  # nothing lost

    ds = RandomCropDataset(url, (8, 16, 16), num_channels=1, length=4, seed=1)
    name, region = ds.region(2)
    assert name == "case"
    np.testing.assert_array_equal(store.read("case", region), full[(slice(None), *region)])
    # spawned workers open their own S3 handles (environment inherited)
    batches = list(DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="spawn"))
    assert len(batches) == 2 and batches[0]["image"].shape == (2, 1, 8, 16, 16)
    assert torch.equal(torch.cat([b["image"] for b in batches])[2], ds[2]["image"])
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1")
