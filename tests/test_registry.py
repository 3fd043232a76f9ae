from __future__ import annotations

import pytest

from ssl_med.registry import BACKBONES, DATASETS, OBJECTIVES, Registry, RegistryError


def test_builtins_are_discovered() -> None:
    assert "vit" in BACKBONES.names()
    assert "mae" in OBJECTIVES.names()
    assert {"demo", "store"} <= set(DATASETS.names())


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(RegistryError, match=r"unknown backbone 'vitt'; choose one of: .*vit"):
        BACKBONES.get("vitt")


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(RegistryError, match=r"unknown option\(s\) \['embed_dims'\].*embed_dim"):
        BACKBONES.build("vit", embed_dims=32)


def test_register_and_duplicate() -> None:
    reg: Registry[object] = Registry("thing", (), "ssl_med.test_things")

    @reg.register("a")
    def make_a(x: int = 1) -> tuple[str, int]:
        return ("a", x)

    assert reg.build("a", x=3) == ("a", 3)
    assert reg.register("a")(make_a) is make_a  # re-registering the same object is harmless
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a")(lambda: None)
    assert reg.names() == ["a"] and "a" in reg and list(reg) == ["a"]
