"""LVM-Med second-order graph-matching objective (``objective=graph_matching``), 2D and 3D, any backbone.

Reference: Nguyen et al., "LVM-Med" (NeurIPS 2023). LVM-Med's pretraining code is not public; this
follows the paper and its lineage code (the group's ``Exgra-Med/.../run_vic.py`` research script and
BB-GM, Rolinek et al. ECCV 2020):

1. two augmented views of each crop (:class:`TwoViews`) -> encoder -> pooled embedding ->
   projector ``h`` -> ``z^s_i, z^t_i`` ``(B, P)``;
2. the batch is split into sub-graphs of about ``graph_size`` images (default 10);
3. per view a directed k-NN graph (``k = 5``, Euclidean, no self loops) on the node features, and
   message passing over it: 2 ``GraphConv`` layers (``x_i' = W_1 x_i + W_2 sum_{j in N(i)} x_j``)
   with ReLU and dropout (p = 0.5) between them;
4. edge features ``e_ik = h_i - h_k``; affinities ``a^v_ij = softplus(<h^s_i, h^t_j>) - 0.5`` and
   ``a^e_(ik),(jl) = softplus(<e^s_ik, e^t_jl>) - 0.5``;
5. costs ``c^v = -a^v + alpha I`` (margin ``alpha = 1`` on the true correspondences, training only)
   and ``c^e = -1/2 a^e`` on pairs of edges;
6. the Lawler QAP is solved per sub-graph on the CPU (:mod:`ssl_med.ops.graph_matching_solvers`,
   all sub-graphs of a size in one batched call) and differentiated as a black box
   (``lambda = 80``): ``dL/dc = -(v - v') / lambda`` with ``v'`` the solution for ``c + lambda dL/dv``;
7. loss = Hamming distance between the matching and the identity, summed over the entries of a
   sub-graph and averaged over sub-graphs;
8. plus VICReg's first-order terms on the projected embeddings of the two views
   (:mod:`objectives.losses.vicreg`): total loss
   ``gm_weight * hamming + inv_coeff * inv + var_coeff * var + cov_coeff * cov`` with the VICReg
   weights 25 / 25 / 1 and ``gm_weight = 1`` by default.

Optional local term (``local_weight > 0``): patch tokens -> a small maps projector; for every image
the ``num_matches`` closest (L2) token pairs between its two views are kept, and the L2 distance
between image ``i``'s (view s) and image ``j``'s (view t) matched token sets is added to
``c^v_ij`` -- the "prior pairwise similarity" by which the lineage code injects local information.

Why the VICReg terms. With the Hamming loss alone, a randomly initialised encoder does not learn:
the pooled embeddings start nearly identical, every affinity ties, the matching stays at chance
(Hamming ~16-20 of 20 for N = 10 on the demo crops, with or without the edge term, margin 0.2-1,
lr 1e-3-1e-2, CLS or mean pooling) and the embeddings drift towards collapse (normalised pooled std
0.02 -> 0.005). LVM-Med and BB-GM start from pretrained encoders. The group's public lineage
script (``run_vic.py``, "Pretraining with VICRegL") carries VICReg's criterion with the
``inv/var/cov`` coefficients 25 / 25 / 1 as arguments, but note: its ``forward`` as published
returns only the graph-matching loss and never calls ``_vicreg_loss``, so whether LVM-Med adds the
first-order terms is *not* confirmed -- adding them is our choice, on by default, and
``inv_coeff = var_coeff = cov_coeff = 0`` gives the graph-matching-only objective back. The
invariance term pulls the two views of an image together and the variance/covariance terms spread
the batch, so the affinities stop tying and the solver's matching carries information.

Weighting. The Hamming loss is piecewise constant; its black-box gradient is
``-(v - v') / lambda``, i.e. +-1/80 per wrong/missed pair on the costs (a perceptron-like signal),
so at ``gm_weight = 1`` its gradient is small next to ``25 inv + 25 var + 1 cov`` on the shared
encoder/projector (the loss *values* are comparable: Hamming 0-20, VICReg ~24 at collapse,
~15-18 after a short run), while the message-passing layers receive only the Hamming gradient
(Adam normalises its scale there). Raise ``gm_weight`` to let the matching shape the embedding
more. ``gm_warmup_steps`` (default 0) ramps the Hamming weight linearly from 0; on the demo runs it
did not help (seed-to-seed noise was larger than any effect), so it is off by default.

Measured (tiny ViT, embed 48, depth 2, mean pooling, projector 64-64, 32x32 demo crops with >= 50 %
foreground, batch 20, AdamW 3e-3, 150 steps, held-out evaluation batch of 80 = 8 sub-graphs,
eval mode; chance = 2 (N - 1) = 18): Hamming 16.5 -> 12.25, 16.5 -> 12.25, 17.75 -> 13.75,
16.25 -> 14.5, 15.75 -> 14.5 for seeds 0-4 (a modest, seed-dependent gain); evaluation loss 40.7 -> 29.3 / 42.0 -> 32.6. Graph matching alone (VICReg weights
0, CLS pooling, seeds 1-3) does not improve (15.0 / 16.5 / 13.5 -> 15.75 / 15.5 / 14.25) and the
normalised pooled std falls to 0.005; VICReg alone (``gm_weight = 0``) reaches about the same Hamming
(14.0 / 13.3) -- in runs this short the matching improves because the embedding improves, not
(measurably) because of the Hamming gradient. With the CLS token of the random ViT the drop is
smaller (15-16.5 -> 13.3-16.3 in 150-200 steps): the CLS output starts nearly input-independent.

Deviations, on purpose:
    * solver: an exact/local-search CPU solver instead of LPMP (not pip-installable without a C++
      build); on small problems it finds the exact optimum (see the tests for the rate);
    * a batch that is not a multiple of ``graph_size`` is split into ``ceil(B / graph_size)``
      sub-graphs of near-equal size (the lineage script drops the remainder); ``k`` is capped at
      ``n - 1`` for small sub-graphs;
    * dense GraphConv on the k-NN adjacency instead of ``torch_geometric`` (same formula);
    * node features after message passing are L2-normalised and scaled by ``feature_scale`` (3)
      before the affinities (BB-GM normalises its features too; the lineage script does not). With
      raw features the dot products quickly reach the flat part of the softplus, all costs tie,
      the margin makes the solver avoid the identity and training stalls at the maximal Hamming
      loss (observed on the demo data with a tiny ViT);
    * one direction (view s -> view t) per step, as the script's global path;
    * local term: feature-space nearest-neighbour matches only (the script also matches by
      location), distances divided by ``sqrt(num_matches)``;
    * views: random resized crop + flips + intensity jitter + noise on the store crop (the paper
      uses the VICRegL 2D multi-crop recipe; these work for 2D and 3D);
    * VICReg first-order terms added to the Hamming loss (see above; not in the published forward
      of the lineage script); VICRegL form (variance and covariance averaged over the two views),
      statistics over the local batch (VICReg all-gathers across GPUs), on the projector output
      before message passing and before the ``feature_scale`` normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Randomizable
from torch import Tensor, nn

from objectives.losses.precision import upcast
from objectives.losses.vicreg import vicreg_terms
from ssl_med.data.channels import carry_channel_keys, encoder_channel_kwargs
from ssl_med.encoder import Encoder
from ssl_med.geometry import CropSpec, GeometryError, ViewGeometry, override, patch_multiple_crop
from ssl_med.objective import Objective, ObjectiveOutput, Sample
from ssl_med.ops.graph_matching_solvers import blackbox_matching
from ssl_med.registry import OBJECTIVES


class TwoViews(Randomizable):
    """One crop ``{"image": (C, *S)}`` -> ``{"view1", "view2"}``, each ``(C, *S)``.

    Each view: random resized crop (area/volume fraction ``U(scale)``, aspect jitter), flips per
    axis with ``flip_prob``, intensity ``a x + b`` with ``a ~ U(1 -/+ contrast)``,
    ``b ~ U(-/+ brightness)`` (probability ``jitter_prob``), Gaussian noise (``noise_std``,
    probability 0.5), clipped to ``[0, 1]``.
    """

    def __init__(
        self,
        scale: Sequence[float] = (0.4, 1.0),
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        contrast: float = 0.3,
        brightness: float = 0.2,
        noise_std: float = 0.03,
    ) -> None:
        self.scale = tuple(scale)
        self.flip_prob, self.jitter_prob = flip_prob, jitter_prob
        self.contrast, self.brightness, self.noise_std = contrast, brightness, noise_std

    def _view(self, x: Tensor) -> Tensor:
        spatial = x.shape[1:]
        nd = len(spatial)
        frac = self.R.uniform(*self.scale)
        log_ar = self.R.uniform(-math.log(4 / 3), math.log(4 / 3), size=nd)
        rel = np.exp(log_ar - log_ar.mean()) * frac ** (1 / nd)
        size = [int(min(s, max(1, round(s * r)))) for s, r in zip(spatial, rel)]
        start = [int(self.R.randint(0, s - c + 1)) for s, c in zip(spatial, size)]
        crop = x[(slice(None), *(slice(a, a + c) for a, c in zip(start, size)))]
        mode = "trilinear" if nd == 3 else "bilinear"
        v = F.interpolate(crop[None], size=tuple(spatial), mode=mode, align_corners=False)[0]
        for axis in range(1, v.ndim):
            if self.R.rand() < self.flip_prob:
                v = v.flip(axis)
        if self.R.rand() < self.jitter_prob:
            a = self.R.uniform(1 - self.contrast, 1 + self.contrast)
            b = self.R.uniform(-self.brightness, self.brightness)
            v = v * float(a) + float(b)
        if self.R.rand() < 0.5:
            noise = torch.from_numpy(self.R.standard_normal(v.shape).astype(np.float32))
            v = v + self.noise_std * noise
        return v.clamp(0, 1).contiguous()

    def __call__(self, sample: Sample) -> Sample:
        x = torch.as_tensor(sample["image"], dtype=torch.float32)
        return carry_channel_keys(sample, {"view1": self._view(x), "view2": self._view(x)})


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """VICReg-style projector ``Linear -> BN -> ReLU ... -> Linear`` over ``dims``."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


def split_sizes(batch: int, graph_size: int) -> list[int]:
    """Near-equal sub-graph sizes: ``ceil(B / N)`` graphs whose sizes differ by at most one."""
    if batch < 2:
        raise ValueError("graph matching needs at least 2 images per batch")
    if graph_size < 2:
        raise ValueError(f"graph_size must be >= 2, got {graph_size}")
    n_graphs = math.ceil(batch / graph_size)
    base, extra = divmod(batch, n_graphs)
    return [base + 1] * extra + [base] * (n_graphs - extra)


def knn_adjacency(x: Tensor, k: int) -> Tensor:
    """Directed k-NN adjacency ``(G, n, n)`` from node features ``(G, n, P)``: ``A[i, j] = 1`` iff
    ``j`` is one of the ``min(k, n-1)`` nearest (L2) other nodes of ``i``."""
    g, n, _ = x.shape
    k = min(k, n - 1)
    d = torch.cdist(x.detach(), x.detach())
    d = d + torch.diag(torch.full((n,), float("inf"), device=x.device, dtype=d.dtype))
    idx = d.topk(k, dim=-1, largest=False).indices
    return torch.zeros(g, n, n, device=x.device, dtype=x.dtype).scatter_(2, idx, 1.0)


class DenseGraphConv(nn.Module):
    """``x_i' = W_1 x_i + W_2 sum_j A[i, j] x_j`` (torch_geometric ``GraphConv``, sum aggregation).

    Shapes: ``x (G, n, P_in)``, ``adj (G, n, n)`` -> ``(G, n, P_out)``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.root = nn.Linear(in_dim, out_dim, bias=True)
        self.rel = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        return self.root(x) + self.rel(torch.bmm(adj, x))


class MessagePassing(nn.Module):
    """Two :class:`DenseGraphConv` layers with ReLU and dropout in between."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1, self.conv2 = DenseGraphConv(dim, hidden), DenseGraphConv(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.conv1(x, adj)), p=self.dropout, training=self.training)
        return self.conv2(h, adj)


def matching_costs(hs: Tensor, ht: Tensor, adj_s: Tensor, adj_t: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Lawler costs of matching graph s to graph t.

    Args:
        hs, ht: ``(G, n, P)`` node features after message passing.
        adj_s, adj_t: ``(G, n, n)`` 0/1 directed edges ``i -> k``.
        margin: added to the unary cost of the true correspondences (diagonal).

    Returns:
        unary ``(G, n, n)`` = ``-(softplus(<hs_i, ht_j>) - 0.5) + margin I`` and quad
        ``(G, n, n, n, n)``, ``quad[i, j, k, l] = -1/2 (softplus(<e^s_ik, e^t_jl>) - 0.5)`` on
        edge pairs, 0 elsewhere.
    """
    n = hs.shape[1]
    unary = -(F.softplus(hs @ ht.transpose(1, 2)) - 0.5)
    if margin:
        unary = unary + margin * torch.eye(n, dtype=unary.dtype, device=unary.device)
    es = hs[:, :, None] - hs[:, None]  # (G, n, n, P): e_ik = h_i - h_k
    et = ht[:, :, None] - ht[:, None]
    edge_aff = F.softplus(torch.einsum("gikp,gjlp->gijkl", es, et)) - 0.5
    mask = torch.einsum("gik,gjl->gijkl", adj_s, adj_t)
    return unary, -0.5 * edge_aff * mask


def hamming_to_identity(v: Tensor) -> Tensor:
    """``sum_ij v_ij (1 - I_ij) + (1 - v_ij) I_ij`` per sub-graph: ``(G, n, n) -> (G,)``."""
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    return (v * (1 - eye) + (1 - v) * eye).sum((1, 2))


@OBJECTIVES.register("graph_matching")
class GraphMatching(Objective):
    """LVM-Med graph-matching objective (see the module docstring).

    Args:
        encoder: any encoder (2D or 3D); ``encoder(x).pooled`` is projected.
        projector: hidden/out widths of the projector (reference 1024-1024-1024).
        graph_size: images per sub-graph ``N`` (10).
        knn: neighbours per node ``k`` (5).
        mp_dropout: dropout between the two graph convolutions (0.5).
        margin: ``alpha`` on the true correspondences (1.0).
        lambda_val: black-box interpolation strength (80).
        solver: ``local_search`` (any N) or ``exact`` (N <= 8).
        edge_weight: multiplies the quadratic (edge) costs (1 = reference).
        feature_scale: node features after message passing are L2-normalised and multiplied by
            this (``None``: raw features, as the lineage code).
        local_weight: weight of the local feature-map cost (0 = off).
        local_dim, num_matches: maps projector width and matched token pairs per image.
        gm_weight: weight of the Hamming (graph-matching) loss.
        inv_coeff, var_coeff, cov_coeff: weights of the VICReg invariance, variance and covariance
            terms on the projected embeddings (25, 25, 1; all 0 = graph matching alone).
        gm_warmup_steps: the Hamming weight ramps linearly from 0 to ``gm_weight`` over this many
            optimiser steps (0 = full weight from the start).
        views: keyword arguments of :class:`TwoViews` (``scale``, ``flip_prob``, ``jitter_prob``,
            ``contrast``, ``brightness``, ``noise_std``); missing ones take its defaults. On the command
            line: ``objective.views.scale=[0.2,1.0]``.
    """

    def __init__(
        self,
        encoder: Encoder,
        projector: Sequence[int] = (256, 256, 256),
        graph_size: int = 10,
        knn: int = 5,
        mp_dropout: float = 0.5,
        margin: float = 1.0,
        lambda_val: float = 80.0,
        solver: str = "local_search",
        feature_scale: float | None = 3.0,
        edge_weight: float = 1.0,
        local_weight: float = 0.0,
        local_dim: int = 64,
        num_matches: int = 8,
        gm_weight: float = 1.0,
        inv_coeff: float = 25.0,
        var_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gm_warmup_steps: int = 0,
        views: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(encoder)
        if solver not in ("local_search", "exact"):
            raise ValueError(f"solver must be 'local_search' or 'exact', got {solver!r}")
        if solver == "exact" and graph_size > 8:
            raise ValueError("solver='exact' enumerates N! matchings; use graph_size <= 8")
        self.graph_size, self.knn = graph_size, knn
        self.feature_scale = feature_scale
        self.edge_weight = edge_weight
        self.margin, self.lambda_val, self.solver = margin, lambda_val, solver
        self.local_weight, self.num_matches = local_weight, num_matches
        if min(gm_weight, inv_coeff, var_coeff, cov_coeff) < 0 or gm_warmup_steps < 0:
            raise ValueError("loss weights and gm_warmup_steps must be >= 0")
        self.gm_weight, self.gm_warmup_steps = gm_weight, gm_warmup_steps
        self.inv_coeff, self.var_coeff, self.cov_coeff = inv_coeff, var_coeff, cov_coeff
        self._step = 0  # optimiser steps done (on_train_step_end), for the Hamming warm-up
        self.views = TwoViews(**(views or {}))
        dims = [encoder.embed_dim, *projector]
        self.projector = mlp(dims)
        self.message_passing = MessagePassing(dims[-1], dims[-1], mp_dropout)
        self.maps_projector = (
            nn.Sequential(nn.Linear(encoder.embed_dim, local_dim), nn.ReLU(inplace=True), nn.Linear(local_dim, local_dim))
            if local_weight > 0
            else None
        )

    def view_transform(self) -> Callable[[Sample], Sample]:
        return self.views

    @classmethod
    def view_geometry(cls, crop: CropSpec, options: Mapping[str, Any]) -> ViewGeometry:
        """Both views have the crop's size; a batch needs at least two images to match."""
        if crop.batch_size < 2:
            raise GeometryError(
                f"graph matching needs at least 2 images per batch, got data.batch_size={crop.batch_size}",
                [override("data.batch_size", 2 * cls.options_with_defaults(options)["graph_size"])],
            )
        size = patch_multiple_crop(crop)
        return ViewGeometry(size, {"view1": size, "view2": size})

    def local_costs(self, maps_s: Tensor, maps_t: Tensor) -> Tensor:
        """``(B, T, Q)`` token maps of the two views -> ``(B, B)`` L2 distances of matched token sets.

        For each image the ``num_matches`` tokens of view s closest to a view-t token are kept,
        paired with those nearest tokens; entry ``(i, j)`` compares image i's view-s set with
        image j's view-t set, divided by ``sqrt(num_matches)``.
        """
        t = maps_s.shape[1]
        m = min(self.num_matches, t)
        d = torch.cdist(maps_s, maps_t)  # (B, T, T)
        nn_val, nn_idx = d.min(dim=2)  # closest view-t token of each view-s token
        keep = nn_val.topk(m, dim=1, largest=False).indices.sort(dim=1).values  # (B, m)
        fs = torch.gather(maps_s, 1, keep[..., None].expand(-1, -1, maps_s.shape[-1]))
        ft = torch.gather(maps_t, 1, torch.gather(nn_idx, 1, keep)[..., None].expand(-1, -1, maps_t.shape[-1]))
        return torch.cdist(fs.flatten(1), ft.flatten(1)) / math.sqrt(m)

    def match(self, zs: Tensor, zt: Tensor, local: Tensor | None = None) -> tuple[Tensor, list[int]]:
        """Hamming losses per sub-graph ``(n_graphs,)`` for projected views ``(B, P)`` and the sizes."""
        sizes = split_sizes(zs.shape[0], self.graph_size)
        losses = []
        for n in sorted(set(sizes)):
            # all sub-graphs of size n, batched: consecutive runs of the batch
            starts = [sum(sizes[:i]) for i, s in enumerate(sizes) if s == n]
            idx = torch.tensor([list(range(s, s + n)) for s in starts], device=zs.device)  # (G, n)
            xs, xt = zs[idx], zt[idx]
            adj_s, adj_t = knn_adjacency(xs, self.knn), knn_adjacency(xt, self.knn)
            hs, ht = self.message_passing(xs, adj_s), self.message_passing(xt, adj_t)
            if self.feature_scale:  # centre per sub-graph, then unit length x scale
                hs = self.feature_scale * F.normalize(hs - hs.mean(1, keepdim=True), dim=-1)
                ht = self.feature_scale * F.normalize(ht - ht.mean(1, keepdim=True), dim=-1)
            unary, quad = matching_costs(hs, ht, adj_s, adj_t, self.margin if self.training else 0.0)
            quad = self.edge_weight * quad
            if local is not None:
                unary = unary + self.local_weight * local[idx[:, :, None], idx[:, None, :]]
            v = blackbox_matching(unary, quad, self.lambda_val, self.solver)
            losses.append(hamming_to_identity(v))
        return torch.cat(losses), sizes

    def forward(self, batch: dict[str, Any]) -> ObjectiveOutput:
        """One step on ``view1``, ``view2`` ``(B, C, *S)``."""
        v1, v2 = batch["view1"], batch["view2"]
        b = v1.shape[0]
        out = self.encoder(torch.cat([v1, v2]), **encoder_channel_kwargs(self.encoder, batch, repeat=2))
        z = self.projector(out.pooled)
        maps = None if self.maps_projector is None else self.maps_projector(out.patch_tokens)
        # matching and VICReg in float32 outside autocast: the solver compares sums of costs, which
        # bf16 rounding (8 significant bits) ties or reorders, flipping the discrete Hamming loss
        with torch.autocast(device_type=z.device.type, enabled=False):
            zs, zt = upcast(z[:b]), upcast(z[b:])
            local = None if maps is None else self.local_costs(upcast(maps[:b]), upcast(maps[b:]))
            per_graph, sizes = self.match(zs, zt, local)
            vic = vicreg_terms(zs, zt)
        hamming = per_graph.mean()
        w_gm = self.current_gm_weight()
        loss = w_gm * hamming + self.inv_coeff * vic.inv + self.var_coeff * vic.var + self.cov_coeff * vic.cov
        with torch.no_grad():
            accuracy = 1 - per_graph.sum() / (2 * sum(sizes))  # fraction of correctly matched images
        terms = {
            "hamming": hamming.detach(),
            "match_accuracy": accuracy,
            "vicreg_inv": vic.inv.detach(),
            "vicreg_var": vic.var.detach(),
            "vicreg_cov": vic.cov.detach(),
            "gm_weight": torch.tensor(w_gm),
        }
        return ObjectiveOutput(loss=loss, terms=terms, embeddings=out.pooled[:b].detach())

    def current_gm_weight(self) -> float:
        """Weight of the Hamming loss at this step (linear warm-up over ``gm_warmup_steps``)."""
        if self.gm_warmup_steps <= 0:
            return self.gm_weight
        return self.gm_weight * min(1.0, self._step / self.gm_warmup_steps)

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        self._step = step

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"view1": batch["view1"], "view2": batch["view2"]}
