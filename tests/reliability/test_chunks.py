"""Lost and damaged chunks raise errors that name the image and chunk, on both read engines: never zeros."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ssl_med.data.integrity import ChunkError, UnverifiableStoreWarning
from ssl_med.data.layout import Layout
from ssl_med.data.store import ImageStore

CT, STACK = "images/ct/0", "stacks/stack"
ENGINES = ("direct", "zarr")


@pytest.mark.parametrize("engine", ENGINES)
def test_intact_store_reads_exactly_with_unwritten_fill_chunks(tiny_store, faults, engine) -> None:
    assert len(faults.chunk_files(tiny_store, CT)) == 7  # zarr skipped the all-air chunk: not an error
    np.testing.assert_array_equal(ImageStore(tiny_store, engine=engine).read("ct"), faults.volume())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", ["deleted", "truncated", "emptied", "flipped"])
def test_one_bad_chunk_is_named(tiny_store, faults, engine, fault) -> None:
    inject, kind = faults.KINDS[fault]
    victim = faults.chunk_files(tiny_store, CT)[3]
    key = faults.key(tiny_store, CT, victim)
    inject(victim)
    store = ImageStore(tiny_store, engine=engine)
    with pytest.raises(ChunkError, match=f"image 'ct': chunk {key} of .*images/ct/0.* is {kind}") as err:
        store.read("ct")
    assert (err.value.kind, err.value.key, err.value.image) == (kind, key, "ct")
    np.testing.assert_array_equal(store.read("ct", (slice(0, 8),) * 3), faults.volume()[:, :8, :8, :8])


@pytest.mark.parametrize("engine", ENGINES)
def test_every_chunk_deleted_fails_every_image(tiny_store, faults, engine) -> None:
    for array in (CT, "images/photo/0", STACK):
        for path in faults.chunk_files(tiny_store, array):
            path.unlink()
    store = ImageStore(tiny_store, engine=engine)
    for name in store:
        with pytest.raises(ChunkError, match=f"image '{name}': chunk c/.* is missing"):
            store.read(name)


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_stack_chunk_names_its_rows_only(tiny_store, faults, engine) -> None:
    faults.flip_byte(faults.chunk_files(tiny_store, STACK)[1])  # rows 2 and 3
    store = ImageStore(tiny_store, engine=engine)
    assert store.read("row1").shape == (1, 8, 8)
    with pytest.raises(ChunkError, match=r"image 'row2': chunk c/1/0/0/0 of .*stacks/stack.* is corrupted"):
        store.read("row2")


@pytest.mark.parametrize("fault", ["deleted", "flipped"])
def test_sharded_arrays_are_checked_through_zarr(tmp_path, faults, fault) -> None:
    path = faults.write_store(tmp_path / "sharded.zarr", Layout(chunk_3d=8, shard_3d=16, chunk_2d=8))
    (shard,) = faults.chunk_files(path, CT)
    inject, kind = faults.KINDS[fault]
    inject(shard) if fault == "deleted" else faults.flip_byte(shard, len(shard.read_bytes()) // 3)
    with pytest.raises(ChunkError, match=f"image 'ct': chunk c/0/0/0/0 of images/ct/0 .* is {kind}"):
        ImageStore(path).read("ct")


def test_shard_index_damage_is_an_error(tmp_path, faults) -> None:
    path = faults.write_store(tmp_path / "sharded.zarr", Layout(chunk_3d=8, shard_3d=16, chunk_2d=8))
    (shard,) = faults.chunk_files(path, CT)
    faults.flip_byte(shard, -8)  # inside the shard index, which carries its own CRC-32C
    with pytest.raises(ChunkError, match="image 'ct': chunk c/0/0/0/0"):
        ImageStore(path).read("ct")


@pytest.mark.parametrize("engine", ENGINES)
def test_stores_without_inventory_still_read_with_one_warning(tiny_store, faults, engine) -> None:
    faults.drop_inventories(tiny_store)
    store = ImageStore(tiny_store, engine=engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(store.read("ct"), faults.volume())
        store.read("photo")
    assert [type(w.message) for w in caught] == [UnverifiableStoreWarning]
    assert "no chunk inventory" in str(caught[0].message)


def test_chunk_error_survives_a_dataloader_reraise() -> None:
    """DataLoader workers re-raise ``type(exc)(message)`` in the main process: the type must allow it."""
    err = ChunkError("detail", kind="missing", key="c/0/0", array="images/x/0").naming("x")
    again = type(err)(str(err))
    assert (
        isinstance(again, ChunkError)
        and str(again) == str(err) == "image 'x': chunk c/0/0 of images/x/0 is missing (detail)"
    )
