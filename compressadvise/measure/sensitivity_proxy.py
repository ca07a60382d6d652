"""Cheap predictions of a (layer, setting)'s damage, without a forward pass.

The search ranks each layer's candidate settings with these before it measures any (issue 23):
the squared weight error the setting causes, times the diagonal of the output-MSE Hessian
(`sensitivity_eval.gradient_proxies`), is a second-order prediction of the output MSE it would
measure. The weight error comes from:
- linear quantization: the library itself (coremltools' PostTrainingQuantizer is closed-form and
  takes milliseconds), so the error is exact;
- palettization: a 1-D Lloyd k-means run on every LUT group at once (density-spaced start, weights
  rounded as coremltools' fast mode rounds them). coremltools runs an exact dynamic-programming
  k-means per group, which costs seconds per layer at 8 bits; Lloyd's error is at least the
  optimum's: within ~1.6x of it at <= 4 bits, but up to several times it where a group has few
  values per centroid (6-8 bits on small groups, where Lloyd stops in a local optimum). The search
  calibrates predictions per layer with what it measures, and only ranks settings with them.
  Settings the fast path does not model (int8 LUTs, per-channel scales, vector clusters) call the
  library.
Every figure here is an estimate; the search measures what it chooses.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from compressadvise.plan.setting import Setting

if TYPE_CHECKING:
    import torch

LLOYD_ITERATIONS = 12
FEW_PER_CENTROID = 16  # below this many values per centroid, start from the widest gaps
ROUNDING = 4  # decimals: coremltools' fast k-means mode rounds fp16 weights to 1e-4 before clustering


def squared_error(w: "torch.Tensor", s: Setting, seed: int = 0) -> "torch.Tensor":
    """(Wq - W)^2 element-wise, in float64, for `w` compressed with setting `s` (an estimate for
    palettization, exact for linear quantization)."""
    from compressadvise.measure.sensitivity_eval import compress_weight

    fast = s.technique == "palettization" and not (
        s.p.get("lut_dtype") not in (None, "fp16") or s.p.get("enable_per_channel_scale") or s.p.get("cluster_dim"))
    wq = lloyd_palettize(w, int(s.p["nbits"]), _group_rows(w, s)) if fast else compress_weight(w, s, seed)
    return (wq.double() - w.double()) ** 2


def _group_rows(w: "torch.Tensor", s: Setting) -> int:
    """Output channels per LUT: all of them for one LUT per tensor."""
    if s.p.get("granularity") == "per_grouped_channel":
        return int(s.p["group_size"])
    return int(w.shape[0])


def lloyd_palettize(w: "torch.Tensor", nbits: int, rows: int, iterations: int = LLOYD_ITERATIONS) -> "torch.Tensor":
    """W with every value replaced by its nearest of 2^nbits centroids, one LUT per `rows` output
    channels (1-D Lloyd k-means over all groups at once)."""
    import torch

    k = 2 ** nbits
    flat = w.detach().float().reshape(w.shape[0], -1)
    n_rows = flat.shape[0]
    pad = (-n_rows) % rows  # a last, smaller group: padded with copies of its own first row
    if pad:
        flat = torch.cat([flat, flat[n_rows - (n_rows % rows):][:1].expand(pad, -1)])
    groups = flat.reshape(-1, rows * flat.shape[1])
    groups = torch.round(groups.half().float() * 10 ** ROUNDING) / 10 ** ROUNDING
    if groups.shape[0] == 1:  # one LUT: cluster the distinct values, weighted by their counts
        values, inverse, counts = torch.unique(groups[0], return_inverse=True, return_counts=True)
        out = _lloyd(values[None], counts[None].float(), k, iterations)[0][inverse][None]
    else:
        values, order = torch.sort(groups, dim=1)
        out = torch.empty_like(groups).scatter_(1, order, _lloyd(values, torch.ones_like(values), k, iterations))
    return out.reshape(-1, flat.shape[1])[:n_rows].reshape(w.shape).to(w.dtype)


def _lloyd(values: "torch.Tensor", weights: "torch.Tensor", k: int, iterations: int) -> "torch.Tensor":
    """Sorted values (g, m) with weights, each snapped to its centroid after Lloyd iterations from
    density-spaced centroids; where a group has few values per centroid, also from the k runs its
    k-1 widest gaps cut it into (near the optimum there), the better kept per group."""
    import torch

    if values.shape[1] <= k:  # every value gets its own centroid
        return values
    best = _refine(values, weights, _panter_dite(values, weights, k), iterations)
    if values.shape[1] < FEW_PER_CENTROID * k:
        other = _refine(values, weights, _widest_gaps(values, weights, k), iterations)
        better = (weights * (other - values) ** 2).sum(1, keepdim=True) < (weights * (best - values) ** 2).sum(1, keepdim=True)
        best = torch.where(better, other, best)
    return best


def _means(values: "torch.Tensor", weights: "torch.Tensor", idx: "torch.Tensor", k: int,
           fallback: "torch.Tensor") -> "torch.Tensor":
    """Weighted mean of each cluster's values (sorted); an empty cluster keeps `fallback`."""
    import torch

    g = values.shape[0]
    sums = torch.zeros(g, k).scatter_add_(1, idx, values * weights)
    counts = torch.zeros(g, k).scatter_add_(1, idx, weights)
    return torch.sort(torch.where(counts > 0, sums / counts.clamp_min(1e-30), fallback), dim=1).values


def _refine(values: "torch.Tensor", weights: "torch.Tensor", centroids: "torch.Tensor",
            iterations: int) -> "torch.Tensor":
    """Lloyd iterations; each value snapped to its nearest final centroid."""
    import torch

    k = centroids.shape[1]
    for _ in range(iterations):
        idx = torch.searchsorted(((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous(), values)
        new = _means(values, weights, idx, k, centroids)
        if torch.equal(new, centroids):
            break
        centroids = new
    bounds = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.gather(centroids, 1, torch.searchsorted(bounds.contiguous(), values))


def _widest_gaps(values: "torch.Tensor", weights: "torch.Tensor", k: int) -> "torch.Tensor":
    """Centroids of the k runs that the k-1 widest gaps between sorted values cut each group into."""
    import torch

    g, m = values.shape
    cuts = torch.topk(values[:, 1:] - values[:, :-1], k - 1, dim=1).indices.sort(dim=1).values  # gap j: after j
    idx = torch.searchsorted(cuts.contiguous(), torch.arange(m).expand(g, m).contiguous())
    return _means(values, weights, idx, k, values[:, :1].expand(g, k))


def _panter_dite(values: "torch.Tensor", weights: "torch.Tensor", k: int, bins: int = 1024) -> "torch.Tensor":
    """Starting centroids spaced by the density^(1/3) of each group's values: the asymptotically
    optimal spacing for squared error (Panter & Dite, 1951), so the tails get their share; plain
    quantiles crowd the centre and Lloyd is slow to move centroids out to the outliers."""
    import torch

    lo, hi = values[:, :1], values[:, -1:]
    width = (hi - lo).clamp_min(1e-12)
    b = ((values - lo) / width * bins).long().clamp_(0, bins - 1)
    hist = torch.zeros(values.shape[0], bins).scatter_add_(1, b, weights)
    cdf = torch.cumsum(hist ** (1 / 3), 1)
    cdf = cdf / cdf[:, -1:]
    q = ((torch.arange(k, dtype=torch.float32) + 0.5) / k).expand(values.shape[0], k).contiguous()
    pos = torch.searchsorted(cdf.contiguous(), q).clamp_(max=bins - 1).float()
    return (lo + (pos + 0.5) / bins * width).contiguous()


def predicted_mse(d2: "torch.Tensor", hessian: "torch.Tensor | None", weight: "torch.Tensor") -> float:
    """The output MSE the error d2 predicts (Hessian diagonal x d2); without a Hessian, the
    relative weight error (a score on another scale: the search calibrates it per layer)."""
    if hessian is not None:
        return float((hessian.double() * d2).sum())
    return float(d2.sum() / (weight.double() ** 2).sum().clamp_min(1e-300))
