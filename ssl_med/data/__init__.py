"""Data layer: the Zarr image store, crop sampling and the Lightning data module."""
