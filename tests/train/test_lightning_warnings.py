"""Lightning warnings a run silences, and only those: that the module's batch-transfer hooks run (they are
meant to; the warning for a hook both the module and the datamodule define still shows), and torch's LeafSpec
deprecation raised from Lightning's own code (raised from anywhere else it still shows)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.trainer.connectors import data_connector
from lightning.pytorch.trainer.connectors.data_connector import _DataHookSelector
from lightning.pytorch.utilities import _pytree as lightning_pytree
from torch.utils._pytree import LeafSpec

from ssl_med.train.module import PretrainModule
from ssl_med.train.run import expect_lightning_leafspec, expect_module_batch_hooks

HOOKS = ("on_before_batch_transfer", "on_after_batch_transfer")


class OwnHooks(L.LightningDataModule):
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch


def _messages(datamodule: L.LightningDataModule, silence: bool) -> list[str]:
    model = PretrainModule.__new__(PretrainModule)  # only its class (which hooks it overrides) is read
    data_connector.warning_cache.clear()  # Lightning warns once per message and process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if silence:
            expect_module_batch_hooks()
        for hook in HOOKS:
            _DataHookSelector(model, datamodule).get_instance(hook)
    return [str(w.message) for w in caught]


def test_module_hooks_warning_is_silenced() -> None:
    loud = _messages(L.LightningDataModule(), silence=False)
    assert len(loud) == 2 and all("in `LightningModule` but have passed in a `LightningDataModule`" in m for m in loud)
    assert _messages(L.LightningDataModule(), silence=True) == []


def test_hooks_defined_twice_still_warn() -> None:
    messages = _messages(OwnHooks(), silence=True)
    assert len(messages) == 2 and all("in both `LightningModule` and `LightningDataModule`" in m for m in messages)


def _leafspec_messages(silence: bool, from_lightning: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if silence:
            expect_lightning_leafspec()
        if from_lightning:
            lightning_pytree._tree_flatten(1.0)  # a leaf: Lightning builds a LeafSpec
        else:
            LeafSpec()
    return [str(w.message) for w in caught if "LeafSpec" in str(w.message)]


def test_lightning_leafspec_deprecation_is_silenced_only_where_lightning_raises_it() -> None:
    assert len(_leafspec_messages(silence=False, from_lightning=True)) == 1
    assert _leafspec_messages(silence=True, from_lightning=True) == []
    assert len(_leafspec_messages(silence=True, from_lightning=False)) == 1
