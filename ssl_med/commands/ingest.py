"""``ssl_med ingest INPUT... --out STORE``: build or extend an image store; ``--verify`` checks one.

Plain argparse rather than Hydra: ingest takes a list of paths and a handful of flags, has no config
groups to compose, and should not create a Hydra run folder for every call.
"""

from __future__ import annotations

import argparse
import sys

from ssl_med.commands import Command

EPILOG = """\
inputs (files or folders, searched recursively):
  NIfTI .nii/.nii.gz             one image; a folder of <case>_<seq>.nii.gz files (BraTS: _t1 _t1ce _t2
                                 _flair) becomes one multi-channel image, its _seg file the label map
  DICOM series (folders)         grouped by SeriesInstanceUID, slices sorted by position, rescale
                                 slope/intercept applied; the volume series of one study in a folder
                                 that share a voxel grid become one multi-channel image, channels named
                                 by SeriesDescription (t1 t1ce t2 flair); the others stay separate, with
                                 a note saying why (--no-series-channels: every series separate)
  PNG/JPEG/BMP/TIFF              2D images; multi-page/multi-channel TIFF by its axes (C/S channels, Z pages)
  MedMNIST .npz                  2D or 3D, every split with its labels
  NumPy .npy                     (Y,X), (Y,X,3), (Z,Y,X) or (C,Z,Y,X)

Volumes are reoriented to RAS (the original affine is kept) and written as OME-Zarr 0.5 images.
Bad inputs are skipped with their reason; re-running resumes without duplicating images.

channel names (what data.channels=[...] and ChAda-ViT's channel vocabulary select by):
  Names found in the files win: BraTS-style suffixes (_t1 _t1ce _t2 _flair), DICOM series
  descriptions of stacked series, R/G/B of colour images and gray. Inputs whose channels carry no name (a 4D NIfTI with the sequences on its 4th axis, a TIFF
  with a C axis, a (C,Z,Y,X) .npy) are stored as ch0, ch1, ... (= unnamed) unless --channel-names
  names them, in channel order. Every unnamed multi-channel input must then have exactly that many
  channels: otherwise the ingest stops before reading or writing anything and lists the files.
  Single-channel inputs keep their name (unless one name is given). Images already in the store
  keep theirs.

examples:
  ssl_med ingest ../shared/data/brats2020_sample --out brats.zarr
  ssl_med ingest /data/ct --out ct.zarr --workers 8 --spacing 1.5 1 1 --hu-clip -1024 3071 --modality CT
  ssl_med ingest /data/Task01_BrainTumour/imagesTr --out brain.zarr --channel-names FLAIR,T1,T1ce,T2
  ssl_med ingest --verify --out ct.zarr
  ssl_med ingest --verify --repair --out ct.zarr
  ssl_med pretrain data=store data.store=ct.zarr data.spatial_dims=3 data.crop_size=[96,96,96]
  ssl_med pretrain data=folder data.path=/data/ct ...   (ingests into a cached store on first use)
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssl_med ingest",
        description="Convert medical images into a chunked, OME-Zarr 0.5 image store for pretraining.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files or folders to ingest")
    p.add_argument(
        "--out", "-o", required=True, metavar="STORE", help="store path or fsspec URL (created if missing)"
    )
    p.add_argument("--workers", "-j", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="resample volumes to this spacing (mm)",
    )
    p.add_argument(
        "--orientation", default="RAS", help="reorient volumes to these axis codes (default RAS; '' keeps)"
    )
    p.add_argument(
        "--hu-clip", type=float, nargs=2, metavar=("LOW", "HIGH"), help="clip CT images to this HU window"
    )
    p.add_argument("--modality", default="", help="modality for inputs that do not record one (e.g. CT, MR)")
    p.add_argument(
        "--channel-names",
        type=_channel_names,
        default=(),
        metavar="NAME,NAME,...",
        help="names of the channels of multi-channel inputs whose files name none (e.g. T1,T1ce,T2,FLAIR for "
        "a 4-channel NIfTI), in channel order; names found in files win (see 'channel names' below)",
    )
    p.add_argument(
        "--series-channels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stack the DICOM volume series of one study in a folder that share a voxel grid as the channels "
        "of one image, named by SeriesDescription (default); --no-series-channels ingests every series as "
        "its own image",
    )
    p.add_argument("--split", default="", help="split recorded for the images (MedMNIST keeps its own)")
    p.add_argument(
        "--chunk", type=int, default=None, help="chunk edge for volumes (default from the benchmark: 64)"
    )
    p.add_argument("--shard", type=int, default=None, help="shard edge for volumes (default: no sharding)")
    p.add_argument(
        "--pyramid",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write downsampled levels for viewers (napari) beside each image; default: for images with "
        "an axis over 256 voxels. Training reads level 0 only",
    )
    p.add_argument("--verify", action="store_true", help="check the store (after ingesting INPUTs, if any)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="with --verify: re-ingest damaged images from their recorded sources (if unchanged), then verify again",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _channel_names(text: str) -> tuple[str, ...]:
    from ssl_med.data.ingest_channels import ChannelNamesError, parse_channel_names

    try:
        return parse_channel_names(text)
    except ChannelNamesError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args: list[str]) -> int:
    from dataclasses import replace

    from ssl_med.data.ingest import IngestOptions, ingest
    from ssl_med.data.ingest_channels import ChannelNamesError
    from ssl_med.data.layout import DEFAULT_LAYOUT
    from ssl_med.data.verify import verify
    from ssl_med.lifetimes import Interrupted

    ns = parser().parse_args(args)
    if not ns.inputs and not ns.verify:
        parser().error("give INPUT paths to ingest, or --verify")
    if ns.repair and not ns.verify:
        parser().error("--repair goes with --verify")
    status = 0
    if ns.inputs:
        layout = DEFAULT_LAYOUT
        if ns.chunk:
            layout = replace(layout, chunk_3d=ns.chunk)
        if ns.shard:
            layout = replace(layout, shard_3d=ns.shard)
        options = IngestOptions(
            spacing=tuple(ns.spacing) if ns.spacing else None,
            orientation=ns.orientation,
            hu_clip=tuple(ns.hu_clip) if ns.hu_clip else None,
            modality=ns.modality,
            split=ns.split,
            layout=layout,
            pyramid=ns.pyramid,
        )
        try:
            report = ingest(
                ns.inputs, ns.out, options, workers=ns.workers, progress=not ns.no_progress, log=lambda _: None,
                channel_names=ns.channel_names, series_channels=ns.series_channels,
            )  # fmt: skip
        except ChannelNamesError as err:  # raised before the store is opened: nothing was written
            print(f"ssl_med ingest: error: {err}", file=sys.stderr)
            return 2
        except Interrupted as stop:  # SIGINT / SIGTERM: what was written is listed, the rest is not
            print(f"ssl_med ingest: {stop}", file=sys.stderr)
            return stop.exit_code
        except KeyboardInterrupt:  # a second Ctrl+C
            print("ssl_med ingest: interrupted; run the same command again to continue", file=sys.stderr)
            return 130
        print(report.summary())
        if report.written == 0 and report.present == 0:
            status = 1
    if ns.verify:
        result = verify(ns.out)
        print(result.summary())
        if ns.repair and not result.ok:
            from ssl_med.data.repair import repair

            print(repair(ns.out, result).summary())
            result = verify(ns.out)
            print(f"after repair: {result.summary()}")
        status = status or (0 if result.ok else 1)
    return status


COMMAND = Command(
    help="convert NIfTI/DICOM/PNG/TIFF/MedMNIST/NumPy inputs into a chunked image store", run=run
)
