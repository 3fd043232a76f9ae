"""Package discovery that pyproject.toml cannot express: the top-level ``conf/`` folder (Hydra configs)
is installed as the package ``ssl_med.conf`` so that installed (non-editable) copies find it too."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ssl_med", "ssl_med.*", "backbones", "backbones.*", "objectives", "objectives.*"]), "ssl_med.conf"],
    package_dir={"ssl_med.conf": "conf"},
)
