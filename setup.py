"""Packaging that pyproject.toml cannot express.

* The top-level ``conf/`` folder (Hydra configs) is installed as the package ``ssl_med.conf`` so that
  installed (non-editable) copies find it too.
* ``ssl_med-timm.pth`` is installed at the root of ``site-packages`` (wheels and editable installs):
  its one line registers ssl_med's backbones with timm when timm is imported
  (``ssl_med/timm_plugin.py``; docs/export.md says why).
"""

from __future__ import annotations

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "ssl_med-timm.pth"


class BuildPyWithPth(build_py):
    """``build_py`` that also puts ``ssl_med-timm.pth`` at the root of the wheel (-> site-packages)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH)]


class _StrategyWithPth:
    """An editable-wheel strategy that also writes ``ssl_med-timm.pth`` into the editable wheel."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:
        self.strategy(wheel, files, mapping)
        with open(PTH, "rb") as fh:
            wheel.writestr(PTH, fh.read())

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.strategy.__exit__(*exc)


class EditableWheelWithPth(editable_wheel):
    """``pip install -e``: setuptools builds editable wheels without ``build_py``'s root files, so the
    ``.pth`` is added to the wheel here (through the strategy hook of setuptools >= 64; without it the
    editable install simply lacks the ``.pth`` and ``import ssl_med.hub`` registers by hand)."""

    def _select_strategy(self, *args, **kwargs):
        strategy = super()._select_strategy(*args, **kwargs)
        return _StrategyWithPth(strategy)


setup(
    packages=[*find_packages(include=["ssl_med", "ssl_med.*", "backbones", "backbones.*", "objectives", "objectives.*"]), "ssl_med.conf"],
    package_dir={"ssl_med.conf": "conf"},
    cmdclass={
        "build_py": BuildPyWithPth,
        **({"editable_wheel": EditableWheelWithPth} if hasattr(editable_wheel, "_select_strategy") else {}),
    },
)
