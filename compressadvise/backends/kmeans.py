"""One k-means for every palettized weight: what the search measures, the torch side and the .mlpackage.

coremltools ships two. optimize.torch's PostTrainingPalettizer clusters each LUT group exactly
(1-D dynamic programming, its vendored kmeans1d) over the group's distinct values after a cast to
fp16 and rounding to 1e-4 ("fast mode", its default), weighted by their counts. optimize.coreml's
palettize_weights in "kmeans" mode runs scikit-learn's k-means++ (one start, tolerance 1e-2) on
groups under 10,000 values and kmeans1d on the raw values above. So a layer's LUTs in the .mlpackage
were not the ones the search measured, and on 4-bit groups of 16 rows of a 270M decoder the second
k-means was 638 s of an 822 s apply (docs/benchmarks.md). The Core ML side now runs the first
algorithm through optimize.coreml's documented custom mode (`OpPalettizerConfig(mode="custom",
lut_function=...)`, called once per LUT group): one algorithm, the same LUTs on both sides.
"""
from __future__ import annotations

from typing import Any, Callable

ROUNDING = 4  # decimals: optimize.torch's KMeansConfig.rounding_precision default
FP16_MAX = 65504.0


def _kmeans1d(values: Any, k: int, weights: Any = None) -> tuple[Any, Any]:
    """(cluster of each value, centroids ascending): the vendored kmeans1d's C routine, called on
    numpy buffers. Its Python wrapper copies every value into a ctypes array and every index out
    into a list, element by element (0.4 of its 3.0 ms on a 16 x 1280 fp16 group's 1,155 distinct
    values at 16 centroids; the C routine is the rest). The same C function on the same float64
    inputs, so the same clusters to the bit."""
    import ctypes

    import numpy as np
    from coremltools._deps.kmeans1d import core

    arr = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    n = arr.size
    k = min(k, n)
    clusters = np.empty(n, dtype=np.dtype(ctypes.c_ulong))
    centroids = np.empty(k, dtype=np.float64)
    dbl, ul = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_ulong)
    out = (ctypes.c_ulong(n), ctypes.c_ulong(k), clusters.ctypes.data_as(ul), centroids.ctypes.data_as(dbl))
    if weights is None:
        core._DLL.cluster(arr.ctypes.data_as(dbl), *out)
    else:
        w = np.ascontiguousarray(weights, dtype=np.float64).reshape(-1)
        core._DLL.cluster_with_weights(arr.ctypes.data_as(dbl), w.ctypes.data_as(dbl), *out)
    return clusters.astype(np.int64), centroids


def cluster(values: Any, nbits: int) -> tuple[Any, Any]:
    """(lut of 2**nbits float32 centroids ascending, one int index per value in C order) for one
    LUT group, exactly as optimize.torch's PostTrainingPalettizer clusters it (fast mode). A group
    with fewer distinct values than centroids pads its LUT with zeros (never indexed)."""
    import numpy as np

    flat = np.asarray(values).reshape(-1)
    k = 1 << nbits
    lut = np.zeros(k, dtype=np.float32)
    if flat.size and float(np.max(flat)) <= FP16_MAX and float(np.min(flat)) >= -FP16_MAX:
        scale = 10 ** ROUNDING
        rounded = np.round(flat.astype(np.float16).astype(np.float32) * scale) / scale
        distinct, inverse, counts = np.unique(rounded, return_inverse=True, return_counts=True)
        clusters, centroids = _kmeans1d(distinct, k, weights=counts)
        lut[:len(centroids)] = centroids
        return lut, clusters[inverse.reshape(-1)]
    clusters, centroids = _kmeans1d(flat, k)  # outside fp16's range: the raw values, as optimize.torch does
    lut[:len(centroids)] = centroids
    return lut, clusters


def lut_function(nbits: int) -> Callable[[Any], tuple[Any, Any]]:
    """optimize.coreml's custom-mode callback: a group's values -> (LUT in their dtype, uint8 indices)."""
    import numpy as np

    def palettize(val: Any) -> tuple[Any, Any]:
        lut, idx = cluster(val, nbits)
        return lut.astype(val.dtype), idx.astype(np.uint8)

    return palettize


def shared(p: dict[str, Any], joint: bool) -> bool:
    """Whether a palettization setting runs this k-means on the Core ML side: scalar centroids with
    no per-channel scale and no sparse mask under the LUT (those keep coremltools' own modes: the
    torch side clusters them differently: vectors, scaled rows, only the kept weights)."""
    return not joint and not p.get("enable_per_channel_scale") and int(p.get("cluster_dim") or 1) == 1


def recipe_lines() -> list[str]:
    """This k-means as code for `export --to coremltools`'s recipe (coremltools alone): `cluster`
    and `lut_function` from their own source, and `torch_kmeans(config, {op: nbits})` to switch
    those ops to it."""
    import inspect

    source = [line for f in (_kmeans1d, cluster, lut_function)
              for line in inspect.getsource(f).splitlines() if line.strip()]
    return ["from typing import Any, Callable", "import attrs",
            f"ROUNDING = {ROUNDING}", f"FP16_MAX = {FP16_MAX}", *source,
            "def torch_kmeans(config, ops):",
            "    # apply's LUTs: the k-means above, through palettize_weights' custom mode",
            "    for name, nbits in ops.items():",
            "        config.op_name_configs[name] = attrs.evolve(config.op_name_configs[name], mode='custom',",
            "                                                    nbits=None, lut_function=lut_function(nbits))",
            "    return config"]
