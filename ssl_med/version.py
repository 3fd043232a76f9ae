"""The package version (``pyproject.toml``'s), in a module of its own so that any module may import it
without importing the package facade."""

__version__ = "0.1.0"
