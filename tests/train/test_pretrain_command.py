"""``ssl_med pretrain``'s report: every process of a DDP/FSDP job finishes the command, one prints."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from ssl_med.commands import pretrain as command
from ssl_med.train import geometry, run


@pytest.mark.parametrize(("rank", "printed"), [(0, True), (1, False)])
def test_only_global_rank_zero_reports_the_encoder(
    rank: int, printed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hydra = SimpleNamespace(overrides=SimpleNamespace(task=[]), runtime=SimpleNamespace(output_dir=str(tmp_path)))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    monkeypatch.setattr(geometry, "prepare_pretrain_config", lambda cfg, overrides: cfg)
    monkeypatch.setattr(run, "pretrain", lambda cfg, out: Path(out) / "encoder")
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    command._task(OmegaConf.create({}))
    out = capsys.readouterr().out
    assert (f"encoder written to {tmp_path / 'encoder'}" in out) is printed
    assert printed or out == ""
