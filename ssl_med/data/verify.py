"""``ssl_med ingest --verify``: check that a store's manifest, arrays and OME metadata agree."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ssl_med.data import ome
from ssl_med.data.store import IMAGES_GROUP, ImageStore


@dataclass
class VerifyReport:
    """``problems`` make a store unusable; ``warnings`` do not (e.g. arrays left by an interrupted ingest)."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.checked} images checked: {'OK' if self.ok else f'{len(self.problems)} problems'}"
        return "\n".join(
            [head, *(f"  problem: {p}" for p in self.problems), *(f"  warning: {w}" for w in self.warnings)]
        )


def verify(path: str, read_data: bool = True) -> VerifyReport:
    """Check every manifest entry: array present, shape/dtype as listed, OME metadata, label maps;
    with ``read_data`` also decode every chunk and check for finite values."""
    store = ImageStore(path)
    report = VerifyReport()
    for name, meta in store.manifest.items():
        report.checked += 1
        try:
            arr = store.array(name)
        except KeyError:
            report.problems.append(f"{name}: array {store.array_path(name)} is missing")
            continue
        shape = tuple(arr.shape[1:]) if meta.index is not None else tuple(arr.shape)
        if shape != tuple(meta.shape):
            report.problems.append(f"{name}: array shape {shape}, manifest says {meta.shape}")
            continue
        if meta.index is None and store.version >= 2:
            attrs = dict(store.root[f"{IMAGES_GROUP}/{name}"].attrs)
            report.problems += [f"{name}: {p}" for p in ome.check_image_attrs(attrs, arr.shape)]
        for label in meta.label_maps:
            try:
                lab = store.root[store.label_path(name, label)]
            except KeyError:
                report.problems.append(f"{name}: label map {label!r} is missing")
                continue
            if tuple(lab.shape[1:]) != tuple(meta.shape[1:]):
                report.problems.append(f"{name}: label map {label!r} has shape {lab.shape}")
        if read_data:
            try:
                data = store.read(name)
            except Exception as exc:
                report.problems.append(f"{name}: cannot read data ({type(exc).__name__}: {exc})")
                continue
            if data.dtype.kind == "f" and not np.isfinite(data).any():
                report.problems.append(f"{name}: no finite values")
    orphans = sorted(set(store.stored_names()) - set(store.manifest))
    if orphans:
        report.warnings.append(
            f"{len(orphans)} image arrays not in the manifest (interrupted ingest? re-run it): {', '.join(orphans[:5])}"
        )
    return report
