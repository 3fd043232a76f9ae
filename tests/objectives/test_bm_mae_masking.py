"""BM-MAE's multimodal masking against an independent implementation of the reference's algorithm.

The reference (Lucas-rbnt/BM-MAE ``bmmae/model.py`` ``generate_random_masks``, adapted from MultiMAE)
is re-implemented here from its description, step by step with its own index bookkeeping (per-modality
``gather`` of an ``arange`` by the shuffled noise order, the concatenated 0/1 mask shuffled with
uniform noise, ``ids_restore``), and fed the same draws as ssl_med's vectorised version. Differences
stated in ``objectives/multimodal_masking.py``: kept indices sorted; missing modalities (not in the
reference) never visible.
"""

from __future__ import annotations

import pytest
import torch

from objectives.multimodal_masking import dirichlet_split, multimodal_masking, visible_budget


def reference_masks(props: torch.Tensor, noises: list[torch.Tensor], tie: torch.Tensor, n_keep: int):
    """The reference's steps on given draws: ``props`` ``(B, M)`` (its Dirichlet sample), one noise
    ``(B, N)`` per modality (its ``torch.rand`` per modality), ``tie`` ``(B, M N)`` (its ``rand_like``).
    Returns per-modality masks (1 = masked) and ``ids_keep``."""
    samples_per_modality = (props * n_keep).round().long()
    modality_masks = []
    for i, noise in enumerate(noises):
        bs, num_tokens = noise.shape
        ids_arange_shuffle = torch.argsort(noise, dim=1)
        mask = torch.arange(num_tokens).unsqueeze(0).expand(bs, -1)
        mask = torch.gather(mask, dim=1, index=ids_arange_shuffle)
        mask = torch.where(mask < samples_per_modality[:, i].unsqueeze(1), 0, 1)
        modality_masks.append(mask)
    mask_all = torch.cat(modality_masks, dim=1)
    ids_shuffle = torch.argsort(mask_all + tie, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask_all = torch.ones_like(mask_all)
    mask_all[:, :n_keep] = 0
    mask_all = torch.gather(mask_all, dim=1, index=ids_restore)
    return torch.split(mask_all, noises[0].shape[1], dim=1), ids_keep


@pytest.mark.parametrize(("b", "m", "n", "ratio"), [(5, 4, 16, 0.75), (3, 2, 27, 0.5), (4, 3, 8, 0.9), (2, 1, 64, 0.75)])
def test_masking_matches_reference_on_fixed_draws(b: int, m: int, n: int, ratio: float) -> None:
    g = torch.Generator().manual_seed(b * 100 + m)
    present = torch.ones(b, m, dtype=torch.bool)
    n_keep = visible_budget(present, n, ratio)
    assert n_keep == int(m * n * (1 - ratio))  # the reference's n_to_keep
    props = dirichlet_split(present, n_keep, n, 1.0, generator=g)
    noises = [torch.rand(b, n, generator=g) for _ in range(m)]
    tie = torch.rand(b, m * n, generator=g)
    ref_masks, ref_keep = reference_masks(props, noises, tie, n_keep)
    keep, mask = multimodal_masking(props, torch.stack(noises, dim=1), tie, n_keep, present)
    assert torch.equal(keep, ref_keep.sort(dim=1).values)
    for i in range(m):
        assert torch.equal(mask[:, i], ref_masks[i].bool())
    assert (~mask).flatten(1).sum(dim=1).eq(n_keep).all()


def test_rounding_surplus_and_shortfall_follow_the_reference() -> None:
    """Proportions whose rounded counts sum above and below the budget."""
    props = torch.tensor([[0.5, 0.5, 0.0], [0.34, 0.33, 0.33], [0.7, 0.3, 0.0]])
    n, n_keep = 10, 5  # 0.5*5 = 2.5 -> 2 (round half to even) twice: shortfall of 1; 0.34*5=1.7 -> 2, 1.65 -> 2: surplus
    g = torch.Generator().manual_seed(0)
    noises = [torch.rand(3, n, generator=g) for _ in range(3)]
    tie = torch.rand(3, 3 * n, generator=g)
    ref_masks, ref_keep = reference_masks(props, noises, tie, n_keep)
    keep, mask = multimodal_masking(props, torch.stack(noises, dim=1), tie, n_keep)
    assert torch.equal(keep, ref_keep.sort(dim=1).values)
    assert torch.equal(mask, torch.stack(ref_masks, dim=1).bool())


def test_dirichlet_split_over_present_modalities() -> None:
    g = torch.Generator().manual_seed(0)
    present = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]] * 400, dtype=torch.bool)
    n, n_keep = 64, 48  # a single modality can fill the budget: no rejection
    props = dirichlet_split(present, n_keep, n, 1.0, generator=g)
    torch.testing.assert_close(props.sum(dim=1), torch.ones(len(present)))
    assert (props[~present] == 0).all() and (props < 1.0 + 1e-6).all()
    full = props[0::3]
    torch.testing.assert_close(full.mean(dim=0), torch.full((4,), 0.25), atol=0.03, rtol=0)  # Dirichlet(1) mean 1/M
    torch.testing.assert_close(props[1::3][:, [0, 2]].mean(dim=0), torch.full((2,), 0.5), atol=0.03, rtol=0)


def test_rejection_keeps_every_modality_within_its_tokens() -> None:
    """Budget 48 of 4 x 16 tokens: no modality may get 16 / 48 = 1/3 or more (the reference's rule)."""
    g = torch.Generator().manual_seed(1)
    present = torch.ones(500, 4, dtype=torch.bool)
    props = dirichlet_split(present, 48, 16, 1.0, generator=g)
    assert (props < 16 / 48).all()
    keep, _mask = multimodal_masking(props, torch.rand(500, 4, 16, generator=g), torch.rand(500, 64, generator=g), 48)
    assert keep.shape == (500, 48)


def test_missing_modalities_are_never_visible() -> None:
    g = torch.Generator().manual_seed(2)
    present = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    n = 16
    n_keep = visible_budget(present, n, 0.5)
    assert n_keep == 8  # the image with one modality sets the budget
    props = dirichlet_split(present, n_keep, n, 1.0, generator=g)
    keep, mask = multimodal_masking(props, torch.rand(3, 4, n, generator=g), torch.rand(3, 4 * n, generator=g), n_keep, present)
    assert mask[~present].all()
    for i in range(3):
        assert present[i, keep[i] // n].all()
