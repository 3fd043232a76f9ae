"""The installed ``ssl_med`` command: help, list, and clear failures."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ssl_med.cli import main
from ssl_med.commands import THREAD_ENV


def test_top_level_help(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "list" in out


def test_unknown_command(capsys) -> None:
    assert main(["pretrian"]) == 2
    assert "unknown command 'pretrian'" in capsys.readouterr().err


def test_list_names_registered_components(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "backbones:" in out and "vit" in out and "mae" in out and "demo" in out


def test_pretrain_help_lists_groups(run_cli) -> None:
    result = run_cli("pretrain", "--help")
    assert result.returncode == 0
    assert "== Configuration groups ==" in result.stdout
    assert "backbone: " in result.stdout and "demo3d" in result.stdout


def test_pretrain_rejects_unknown_key_and_name(run_cli) -> None:
    bad_key = run_cli("pretrain", "+data.batchsize=4")
    assert bad_key.returncode != 0 and "unknown key(s) ['batchsize'] in 'data'" in bad_key.stderr
    bad_name = run_cli("pretrain", "backbone=vitt")
    assert bad_name.returncode != 0 and "Could not find 'backbone/vitt'" in bad_name.stderr


def test_num_threads_option_of_pretrain_and_evaluate(monkeypatch: pytest.MonkeyPatch) -> None:
    """``num_threads=N`` composes in both commands' configs and sets torch's intra-op threads and the BLAS
    threads of numpy / scikit-learn (the linear probe's fits)."""
    import torch
    from hydra import compose, initialize_config_module
    from threadpoolctl import threadpool_info, threadpool_limits

    from ssl_med.commands import apply_num_threads
    from ssl_med.train.geometry import prepare_pretrain_config

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    for name in THREAD_ENV:  # apply_num_threads sets them: restored after the test
        monkeypatch.setenv(name, "2")
    before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=None):  # restores the pools' sizes on exit
            for config in ("pretrain", "evaluate"):
                with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
                    cfg = compose(config_name=config, overrides=["num_threads=1"])
                if config == "pretrain":
                    prepare_pretrain_config(cfg, ["num_threads=1"])
                torch.set_num_threads(2)
                threadpool_limits(limits=2, user_api="blas")
                apply_num_threads(cfg)
                assert torch.get_num_threads() == 1
                assert blas_threads() and set(blas_threads()) == {1}, "numpy's BLAS (the probes' fits) on one thread"
            apply_num_threads({"num_threads": None})  # null: left alone
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_num_threads_reaches_the_blas_of_libraries_loaded_later() -> None:
    """scipy and scikit-learn bring their own OpenBLAS / OpenMP, loaded when the evaluator first imports them,
    after the command applied ``num_threads``: they must start with that many threads too."""
    script = (
        "from omegaconf import OmegaConf\n"
        "from ssl_med.commands import apply_num_threads\n"
        "apply_num_threads(OmegaConf.create({'num_threads': 1}))\n"
        "import scipy.linalg, sklearn.linear_model\n"
        "from threadpoolctl import threadpool_info\n"
        "pools = threadpool_info()\n"
        "assert {p['user_api'] for p in pools} >= {'blas'}, pools\n"
        "assert all(p['num_threads'] == 1 for p in pools), pools\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
