"""DINO / iBOT projection heads and iBOT block masks (``objective=dino``; split from the objective as
dinov2 keeps ``layers/dino_head.py`` and ``data/masking.py`` apart).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


# -- heads ----------------------------------------------------------------------------------------
class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation ``W = g * v / ||v||`` (per output row).

    State-dict keys ``weight_g (K, 1)`` and ``weight_v (K, d)`` match the reference's deprecated
    ``torch.nn.utils.weight_norm`` layout (RAD-DINO's ``dino_head.safetensors``). ``g`` starts at 1.

    Shapes: ``(..., d) -> (..., K)``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        v = nn.Linear(in_features, out_features, bias=False).weight.detach().clone()  # torch's default init
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    ``in_dim -> hidden_dim (GELU) -> ... -> bottleneck_dim`` (``nlayers`` linear layers, no batch norm),
    ``F.normalize``, then :class:`WeightNormLinear` to ``out_dim`` prototypes.

    Shapes: ``(M, in_dim) -> (M, out_dim)``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_trunc_normal_init)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, p=2, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# -- iBOT masks -----------------------------------------------------------------------------------
class BlockMaskGenerator:
    """Block-wise (BEiT / DINOv2 ``MaskingGenerator``) masks on a 2D or 3D token grid.

    Repeats: pick a box of volume ``~ U(min_num_patches, budget)`` (budget = patches still to mask,
    capped at ``max_num_patches``) and a random log-aspect in ``[log min_aspect, log max_aspect]``;
    each side must be smaller than the grid; up to 10 tries per box; a box is accepted if it adds at
    least one new patch without exceeding the budget. Stops at the target count or when a box adds
    nothing, so the result never exceeds the target.

    Args:
        grid: token grid ``(h, w)`` or ``(d, h, w)``.
        min_num_patches: smallest box volume (4).
        max_num_patches: largest box volume (``None``: half the grid, as DINOv2).
        min_aspect, max_aspect: aspect-ratio range (0.3, ``1 / min_aspect``).
    """

    def __init__(
        self,
        grid: Sequence[int],
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.grid = tuple(int(g) for g in grid)
        self.num_patches = math.prod(self.grid)
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _box(self, area: float, rng: random.Random) -> list[int]:
        nd = len(self.grid)
        if nd == 2:
            ar = math.exp(rng.uniform(*self.log_aspect))
            return [round(math.sqrt(area * ar)), round(math.sqrt(area / ar))]
        logs = [rng.uniform(*self.log_aspect) for _ in range(nd)]
        mean = sum(logs) / nd
        return [round(area ** (1.0 / nd) * math.exp(v - mean)) for v in logs]

    def _add_box(self, mask: np.ndarray, budget: int, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            sides = self._box(area, rng)
            if not all(0 < s < g for s, g in zip(sides, self.grid)):
                continue
            starts = [rng.randint(0, g - s) for s, g in zip(sides, self.grid)]
            region = tuple(slice(a, a + s) for a, s in zip(starts, sides))
            new = math.prod(sides) - int(mask[region].sum())
            if 0 < new <= budget:
                mask[region] = True
                return new
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> np.ndarray:
        """A bool mask of shape ``grid`` with at most ``num_masking_patches`` True."""
        mask = np.zeros(self.grid, dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = int(min(num_masking_patches - count, self.max_num_patches))
            if budget <= 0:
                break
            delta = self._add_box(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


def ibot_masks(
    n_images: int,
    generator: BlockMaskGenerator,
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    rng: random.Random | None = None,
) -> Tensor:
    """DINOv2's per-batch iBOT masks (``collate_data_and_cast``).

    ``int(n_images * mask_probability)`` images get a block mask whose target count is
    ``int(N * U(lo_i, hi_i))`` for the i-th of the evenly spread ratio bins of ``ratio_min_max``;
    the others get none; the list is shuffled.

    Returns:
        ``(n_images, N)`` bool, raster order.
    """
    rng = rng or random.Random()
    n = generator.num_patches
    n_masked = int(n_images * mask_probability)
    bounds = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    masks = [
        generator(int(n * rng.uniform(bounds[i], bounds[i + 1])), rng).reshape(-1) for i in range(n_masked)
    ]
    masks += [np.zeros(n, dtype=bool) for _ in range(n_images - n_masked)]
    rng.shuffle(masks)
    return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, n, dtype=torch.bool)
