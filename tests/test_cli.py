"""The installed ``ssl_med`` command: help, list, and clear failures."""

from __future__ import annotations

from ssl_med.cli import main


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
