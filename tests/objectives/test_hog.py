"""HOG targets (MaskFeat) against scikit-image's HOG, restricted to the blocks that are the patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from objectives.losses.hog import default_cell_size, hog_dim, hog_targets
from ssl_med.layers.patch_embed import patchify

skimage_feature = pytest.importorskip("skimage.feature")


def skimage_patch_hog(image: np.ndarray, patch: tuple[int, int], cell: int) -> np.ndarray:
    """``(N, k_h * k_w * 9)``: skimage's L2-normalised blocks of ``k_h x k_w`` cells, the blocks that tile the
    image patch by patch (skimage slides its blocks one cell at a time)."""
    kh, kw = patch[0] // cell, patch[1] // cell
    blocks = skimage_feature.hog(
        image, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(kh, kw), block_norm="L2",
        feature_vector=False,
    )  # fmt: skip
    aligned = blocks[::kh, ::kw]  # (gh, gw, kh, kw, 9)
    return aligned.reshape(aligned.shape[0] * aligned.shape[1], -1)


@pytest.mark.parametrize(("size", "patch", "cell"), [((28, 28), (4, 4), 2), ((32, 32), (8, 8), 4), ((21, 21), (7, 7), 7), ((16, 24), (4, 8), 2)])
def test_descriptor_matches_skimage(size: tuple[int, int], patch: tuple[int, int], cell: int) -> None:
    image = np.random.default_rng(0).random(size)
    ours = hog_targets(torch.tensor(image)[None, None], patch, cell)[0].double().numpy()
    reference = skimage_patch_hog(image, patch, cell)
    assert ours.shape == reference.shape == (reference.shape[0], hog_dim(patch, cell, 1))
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_channels_are_described_one_by_one_and_concatenated() -> None:
    images = torch.rand(2, 3, 16, 16)
    joint = hog_targets(images, (4, 4), 2)
    apart = torch.cat([hog_targets(images[:, c : c + 1], (4, 4), 2) for c in range(3)], dim=-1)
    assert joint.shape == (2, 16, 3 * 36)
    torch.testing.assert_close(joint, apart)


def test_brightness_and_contrast_do_not_change_the_descriptor() -> None:
    images = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(hog_targets(3.0 * images + 0.5, (4, 4), 2), hog_targets(images, (4, 4), 2), atol=1e-4, rtol=0)


def test_patches_come_in_patchify_order() -> None:
    image = torch.zeros(1, 1, 16, 16)
    image[..., 9:11, 5] = 1.0  # an edge inside the patch at row 2, column 1 of a 4 x 4 grid
    described = hog_targets(image, (4, 4), 2)[0].norm(dim=-1) > 0
    pixels = patchify(image, (4, 4))[0].abs().sum(dim=-1) > 0
    assert described[2 * 4 + 1] and pixels[2 * 4 + 1]
    assert described.nonzero().flatten().tolist() == [9]  # the gradients stay inside the patch


def test_geometry_is_checked() -> None:
    assert default_cell_size((4, 4)) == 2 and default_cell_size((16, 16)) == 8 and default_cell_size((7, 7)) == 7
    with pytest.raises(ValueError, match="2D only"):
        hog_dim((8, 8, 8), 4, 1)
    with pytest.raises(ValueError, match="must divide"):
        hog_targets(torch.rand(1, 1, 28, 28), (4, 4), 3)
    with pytest.raises(ValueError, match="not a multiple"):
        hog_targets(torch.rand(1, 1, 30, 28), (4, 4), 2)
