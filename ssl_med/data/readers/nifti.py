"""NIfTI files (``.nii``, ``.nii.gz``) and case folders of one file per sequence (BraTS style)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ssl_med.data.readers.base import ReadError, Record, Source

LABEL_SUFFIXES = ("seg", "label", "labels", "mask", "gt")
# MRI sequences that make a case folder (with label suffixes), in the order BraTS and most pipelines stack them
SEQUENCE_ORDER = (
    "t1", "t1n", "t1w", "t1ce", "t1c", "t1gd", "t2", "t2w", "flair", "t2f", "pd", "pdw", "t2star", "swi", "dwi", "adc",
)  # fmt: skip
MR_SEQUENCES = set(SEQUENCE_ORDER)
#: largest difference between the affines of two sequences stacked as channels of one image
AFFINE_TOLERANCE = 1e-3


#: words that mark a T1 sequence (``mprage``, ``spgr``, ... are T1-weighted 3D gradient echoes)
T1_WORDS = frozenset({"t1", "t1w", "t1wi", "mprage", "spgr", "fspgr", "bravo", "vibe", "tfl"})
#: words that mark a post-contrast acquisition (``+`` spellings are rewritten to ``post`` first)
POST_CONTRAST_WORDS = frozenset(
    {"post", "postcontrast", "postgd", "ce", "c", "gd", "gad", "gado", "gadolinium", "contrast", "enhanced"}
)
#: words that mark a pre-contrast (native) acquisition; they win over the post-contrast words
PRE_CONTRAST_WORDS = frozenset({"pre", "precontrast", "pregd", "native", "non", "nc", "without", "no", "plain"})
_JOINED_T1 = re.compile(r"t1w?(?:c|ce|gd|gad|post|postcontrast|contrast|pre|precontrast)")


def canonical_sequence(text: str) -> str | None:
    """``t1ce`` for a clinical spelling of post-contrast T1, ``t1`` for an explicitly pre-contrast one,
    else ``None`` (the caller keeps its own name).

    ``"T1 post contrast"``, ``"T1 POST"``, ``"T1+C"``, ``"T1 C+"``, ``"T1 Gd"``, ``"T1-CE"``, ``"MPRAGE
    post"``, ``"t1_post"`` -> ``t1ce``; ``"T1 pre"``, ``"T1 pre contrast"``, ``"T1 without contrast"`` ->
    ``t1``; ``"T1"``, ``"FLAIR"``, ``"DWI post"`` -> ``None``. A description is split into lower-case
    words (``c+``, ``+c``, ``+gd`` and a lone ``+`` read as ``post``, ``w/o`` as ``without``); it is T1 when
    a word is in :data:`T1_WORDS` (or joined, ``t1post``, ``t1gd``), and the pre-contrast words
    (:data:`PRE_CONTRAST_WORDS`) win over the post-contrast ones (:data:`POST_CONTRAST_WORDS`).
    """
    lower = text.strip().lower().replace("w/o", " without ").replace("w/out", " without ").replace("w/", " with ")
    lower = re.sub(r"\+\s*(?:c|gd|gad|contrast)\b|\b(?:c|gd|gad)\s*\+|\+", " post ", lower)
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"mp[^a-z0-9]?rage", "mprage", lower)) if w]
    joined = [w for w in words if _JOINED_T1.fullmatch(w)]
    if not joined and not T1_WORDS.intersection(words):
        return None
    suffixes = {w[2:].lstrip("w") for w in joined}
    pre = bool(PRE_CONTRAST_WORDS.intersection(words) or suffixes & {"pre", "precontrast"})
    post = bool(POST_CONTRAST_WORDS.intersection(words) or suffixes - {"pre", "precontrast"})
    if pre:
        return "t1"
    return "t1ce" if post else None


def ordered_sequences(names: Sequence[str]) -> list[str]:
    """Sequence names in channel order: :data:`SEQUENCE_ORDER` first, then any other name alphabetically."""
    return sorted(names, key=lambda s: (SEQUENCE_ORDER.index(s) if s in SEQUENCE_ORDER else len(SEQUENCE_ORDER), s))


def nifti_stem(path: str | Path) -> str:
    name = Path(path).name
    return re.sub(r"\.nii(\.gz)?$", "", name)


def _size(n: int) -> str:
    """``n`` bytes for a reason message (``54.0 TB``)."""
    value, units = float(n), ("bytes", "kB", "MB", "GB", "TB")
    k = 0
    while value >= 1000 and k < len(units) - 1:
        value, k = value / 1000, k + 1
    return f"{n} bytes" if k == 0 else f"{value:.1f} {units[k]}"


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Data ``(I, J, K[, T])`` (scaled by ``scl_slope``/``scl_inter`` if set) and its 4x4 affine."""
    import nibabel as nib

    p = Path(path)
    if p.stat().st_size == 0:
        raise ReadError("zero-size file")
    image = nib.load(str(p))
    shape, dtype = tuple(int(n) for n in image.header.get_data_shape()), np.dtype(image.get_data_dtype())
    declared = math.prod(shape) * dtype.itemsize
    described = f"its header declares {'x'.join(map(str, shape))} {dtype} voxels ({_size(declared)})"
    offset = int(image.header.get("vox_offset", 0))
    if not str(p).lower().endswith(".gz") and offset + declared > p.stat().st_size:
        held = _size(p.stat().st_size)
        raise ReadError(f"{described} but the file holds {held}: truncated, or a corrupt header")
    try:
        data = np.asanyarray(image.dataobj)
    except MemoryError:  # numpy's own message is empty when the request is absurd
        raise ReadError(f"{described}, more than can be allocated: a corrupt header or too large a volume") from None
    if data.ndim < 2 or data.ndim > 4:
        raise ReadError(f"unsupported NIfTI shape {data.shape}")
    return data, np.asarray(image.affine, dtype=np.float64)


def _volume(data: np.ndarray, path: str) -> np.ndarray:
    """``(C, I, J, K)``: a 4th axis (time/components) becomes channels; 2D files get ``K = 1``."""
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 3:
        return data[None]
    if data.shape[3] > 16:
        raise ReadError(f"{path}: 4D NIfTI with {data.shape[3]} volumes (time series are not supported)")
    return np.moveaxis(data, 3, 0)


def read_nifti_source(source: Source) -> Iterator[Record]:
    path = source.paths[0]
    data, affine = load_nifti(path)
    volume = _volume(data, path)
    yield Record(name=source.name, array=volume, affine=affine, source=str(path))


def case_suffixes(files: list[str]) -> dict[str, str] | None:
    """``{suffix: file}`` if ``files`` look like one case (``<prefix>_<sequence>.nii.gz``), else ``None``.

    Suffixes are lower-cased; a clinical spelling of pre/post-contrast T1 that is not itself a sequence
    name becomes ``t1``/``t1ce`` (:func:`canonical_sequence`: ``<case>_t1_post.nii.gz`` is ``t1ce``).
    Only MR sequence suffixes (:data:`SEQUENCE_ORDER`) and label suffixes (:data:`LABEL_SUFFIXES`)
    make a case: ``ct_liver.nii.gz`` and ``ct_lung.nii.gz`` in one folder are two images, not two
    channels of one.
    """
    stems = [nifti_stem(f) for f in files]
    if len(stems) < 2 or len(stems) > 12:
        return None
    common = stems[0]
    for s in stems[1:]:
        while not s.startswith(common):
            common = common[:-1]
    cut = max(common.rfind("_"), common.rfind("-"))
    if cut < 0:
        return None
    prefix = common[: cut + 1]
    suffixes = [s[len(prefix) :] for s in stems]
    keys = [_suffix_name(s.lower()) for s in suffixes]
    known = set(keys) <= MR_SEQUENCES | set(LABEL_SUFFIXES) and bool(MR_SEQUENCES & set(keys))
    if not known or len(set(keys)) != len(keys):
        return None
    return dict(zip(keys, files))


def _suffix_name(suffix: str) -> str:
    """A file suffix as a channel name: kept when it is a sequence or label name (BraTS 2023's ``t1c``
    stays ``t1c``), else :func:`canonical_sequence` of it when that gives one (``t1_post`` -> ``t1ce``)."""
    if suffix in MR_SEQUENCES or suffix in LABEL_SUFFIXES:
        return suffix
    return canonical_sequence(suffix) or suffix


def read_case(source: Source) -> Iterator[Record]:
    """All sequences of one case as channels ``(C, I, J, K)``; ``seg``-like files become label maps."""
    by_suffix = case_suffixes(list(source.paths))
    if by_suffix is None:
        raise ReadError("not a case folder")
    channels = ordered_sequences([s for s in by_suffix if s not in LABEL_SUFFIXES])
    if not channels:
        raise ReadError("case folder has only label files")
    arrays, affine = [], None
    for suffix in channels:
        data, aff = load_nifti(by_suffix[suffix])
        if data.ndim != 3:
            raise ReadError(f"sequence {suffix!r}: expected a 3D volume, got {data.shape}")
        if arrays and data.shape != arrays[0].shape:
            raise ReadError(
                f"inconsistent case: {suffix!r} is {data.shape}, {channels[0]!r} is {arrays[0].shape}"
            )
        if affine is not None and not np.allclose(aff, affine, atol=AFFINE_TOLERANCE):
            raise ReadError(f"inconsistent case: {suffix!r} has a different affine than {channels[0]!r}")
        arrays.append(data)
        affine = aff
    dtype = np.result_type(*arrays)
    labels = {}
    for suffix in by_suffix:
        if suffix in LABEL_SUFFIXES:
            lab, _ = load_nifti(by_suffix[suffix])
            if lab.shape != arrays[0].shape:
                raise ReadError(f"label {suffix!r} is {lab.shape}, image is {arrays[0].shape}")
            labels["seg" if suffix in ("seg", "label", "labels") else suffix] = np.asarray(
                np.rint(lab), dtype=np.int32
            )
    yield Record(
        name=source.name,
        array=np.stack([a.astype(dtype, copy=False) for a in arrays]),
        affine=affine,
        modality="MR" if set(channels) <= MR_SEQUENCES else "",
        channel_names=tuple(channels),
        source=str(Path(source.paths[0]).parent),
        labels=labels,
        extra={"files": {s: Path(f).name for s, f in by_suffix.items()}},
    )
