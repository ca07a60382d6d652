"""coremltools, torch side (`coremltools.optimize.torch`): the result is an nn.Module that runs here.

Palettization (PostTrainingPalettizer, SKMPalettizer), weight quantization
(PostTrainingQuantizer, GPTQ), pruning (MagnitudePruner, SparseGPT). The compressed module
keeps dense float weights snapped to the LUT / grid / zeros plus coremltools' compression
metadata, so `ct.convert` of it yields the compressed Core ML ops directly.
"""
from __future__ import annotations

import re
from typing import Any

from compressadvise.errors import CompressionFailed, Unavailable
from compressadvise.backends import (Context, HandlerTable, LayerJob, StepJob, handles, import_quietly, need, quiet,
                                     run_handler)

ID = "coremltools.torch"

PALETTIZE = ("palettization", "sensitive_kmeans", "dkm")
QUANTIZE = ("linear_quantization", "gptq")
PRUNE = ("pruning", "sparsegpt")


class CoremltoolsTorch(HandlerTable):
    id = ID
    side = "torch"

    # -------------------------------------------------------------- checks before work
    def unavailable(self, job: StepJob, ctx: Context) -> str | None:
        if missing := self.no_handler(job):
            return missing
        try:
            import_quietly("coremltools.optimize.torch")
        except Unavailable as e:
            return str(e)
        return None

    def layer_support(self, job: StepJob, lj: LayerJob, module: Any) -> str | None:
        supported = _supported_modules(job.technique)
        if module is None or not isinstance(module, supported):
            kind = type(module).__name__ if module is not None else "no module"
            names = ", ".join(sorted({t.__name__ for t in supported}))
            return f"{kind} is not a module coremltools.torch {job.technique} handles ({names})"
        if type(module).__name__ == "MultiheadAttention" and lj.param != "in_proj_weight":
            return f"{lj.tensor}: only the fused in_proj weight of MultiheadAttention is handled here"
        return None  # gptq/sparsegpt also need a Sequential model: checked in run

    # -------------------------------------------------------------- the work
    def run(self, model: Any, job: StepJob, ctx: Context) -> Any:
        with quiet():
            return run_handler(self.id, model, job, ctx)


def _supported_modules(technique: str) -> tuple:
    with quiet():
        if technique in PALETTIZE:
            from coremltools.optimize.torch.palettization import PostTrainingPalettizer

            return tuple(PostTrainingPalettizer._supported_modules)
        if technique in ("joint_compression", "joint_sparse_quantization"):
            from coremltools.optimize.torch.pruning import MagnitudePruner

            return tuple(MagnitudePruner._supported_modules)  # pruned first: its modules bound the step
        if technique == "linear_quantization":
            from coremltools.optimize.torch.quantization import PostTrainingQuantizer

            return tuple(PostTrainingQuantizer._supported_modules)
        if technique == "qat":
            from coremltools.optimize.torch.quantization import LinearQuantizer

            return tuple(t for t in LinearQuantizer._supported_modules if isinstance(t, type))  # it lists functions too
        if technique in ("pruning", "gradual_pruning"):
            from coremltools.optimize.torch.pruning import MagnitudePruner

            return tuple(MagnitudePruner._supported_modules)
    import torch

    return (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def _key(module: str) -> str:
    # coremltools matches module_name_configs keys with re.fullmatch: escape the dots.
    return re.escape(module)


def _palettizer_options(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    opts: dict[str, Any] = {"n_bits": int(need(p, "nbits"))}
    if p.get("granularity") == "per_grouped_channel":
        opts["granularity"] = "per_grouped_channel"
        opts["group_size"] = int(need(p, "group_size"))
    if p.get("lut_dtype") == "int8":
        opts["lut_dtype"] = torch.int8
    if p.get("enable_per_channel_scale"):
        opts["enable_per_channel_scale"] = True
    if p.get("cluster_dim"):
        opts["cluster_dim"] = int(p["cluster_dim"])
    return opts


@handles(ID, "palettization", api="coremltools.optimize.torch.palettization.PostTrainingPalettizer")
def _post_training_palettize(model: Any, job: StepJob, ctx: Context | None = None) -> Any:
    from coremltools.optimize.torch.palettization import (ModulePostTrainingPalettizerConfig,
                                                          PostTrainingPalettizer,
                                                          PostTrainingPalettizerConfig)

    configs = {_key(lj.module): ModulePostTrainingPalettizerConfig(**_palettizer_options(lj.params))
               for lj in job.layers}
    config = PostTrainingPalettizerConfig(global_config=None, module_name_configs=configs)
    return PostTrainingPalettizer(model, config).compress(inplace=True)


def _calibration(ctx: Context, technique: str, limit: int) -> tuple[list, Any]:
    """(batches, loss_fn) from the samples; labels when given, else the float model's own argmax."""
    import torch

    s = ctx.samples
    if s is None:
        raise Unavailable(f"{technique} needs calibration samples", hint="pass --samples FILE (or --samples bundled)")
    n = min(len(s), limit)
    labels = s.labels
    if labels is None:
        with torch.no_grad():
            ref = ctx.float_module(*s.batch(0, n))
        labels = ref.argmax(-1) if ref.dim() >= 2 else ref
    batches = [(s.batch(i, i + 1), labels[i:i + 1]) for i in range(n)]

    def loss_fn(model, data):
        inputs, target = data
        out = model(*inputs)
        if target.dtype in (torch.int64, torch.int32) and out.dim() >= 2:
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        return torch.nn.functional.mse_loss(out, target.to(out.dtype))

    return batches, loss_fn


@handles(ID, "sensitive_kmeans", api="coremltools.optimize.torch.palettization.SKMPalettizer")
def _skm_palettize(model: Any, job: StepJob, ctx: Context) -> Any:
    from coremltools.optimize.torch.palettization import (ModuleSKMPalettizerConfig, SKMPalettizer,
                                                          SKMPalettizerConfig)

    batches, loss_fn = _calibration(ctx, job.technique, int(job.params.get("calibration_samples", 128)))
    configs = {}
    for lj in job.layers:
        opts = _palettizer_options(lj.params)
        opts.pop("enable_per_channel_scale", None)
        configs[_key(lj.module)] = ModuleSKMPalettizerConfig(**opts)
    config = SKMPalettizerConfig(global_config=None, module_name_configs=configs,
                                 calibration_nsamples=len(batches))
    return SKMPalettizer(model, config).compress(dataloader=batches, loss_fn=loss_fn, inplace=True)


def _quantizer_options(p: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "weight_dtype": f"int{int(need(p, 'nbits'))}",
        "granularity": p.get("granularity", "per_channel"),
        "quantization_scheme": "affine" if p.get("mode") == "linear" else "symmetric",
    }
    if opts["granularity"] == "per_block":
        opts["block_size"] = int(need(p, "block_size"))
    return opts


@handles(ID, "linear_quantization", api="coremltools.optimize.torch.quantization.PostTrainingQuantizer")
def _post_training_quantize(model: Any, job: StepJob, ctx: Context | None = None) -> Any:
    from coremltools.optimize.torch.quantization import (ModulePostTrainingQuantizerConfig,
                                                         PostTrainingQuantizer,
                                                         PostTrainingQuantizerConfig)

    # coremltools wants one quantization scheme per call: one pass per scheme.
    by_scheme: dict[str, dict[str, Any]] = {}
    for lj in job.layers:
        opts = _quantizer_options(lj.params)
        by_scheme.setdefault(opts["quantization_scheme"], {})[_key(lj.module)] = \
            ModulePostTrainingQuantizerConfig(**opts)
    for configs in by_scheme.values():
        config = PostTrainingQuantizerConfig(global_config=None, module_name_configs=configs)
        model = PostTrainingQuantizer(model, config).compress(inplace=True)
    return model


def n_m_ratio(p: dict[str, Any]) -> tuple[int, int] | None:
    """n:m pruning ratio from `n_m` ("2:4"), `n_m_ratio` ([2, 4]) or `n` and `m`."""
    raw = p.get("n_m_ratio", p.get("n_m"))
    if isinstance(raw, str) and ":" in raw:
        n, m = raw.split(":", 1)
        return int(n), int(m)
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        return int(raw[0]), int(raw[1])
    if p.get("n") and p.get("m"):
        return int(p["n"]), int(p["m"])
    return None


@handles(ID, "pruning", api="coremltools.optimize.torch.pruning.MagnitudePruner")
def _magnitude_prune(model: Any, job: StepJob, ctx: Context | None = None) -> Any:
    from coremltools.optimize.torch.pruning import (ConstantSparsityScheduler, MagnitudePruner,
                                                    MagnitudePrunerConfig, ModuleMagnitudePrunerConfig)

    configs = {}
    for lj in job.layers:
        p = lj.params
        # One-shot: the scheduler reaches the target at the first step() call.
        opts: dict[str, Any] = {"scheduler": ConstantSparsityScheduler(begin_step=1),
                                "param_name": lj.param}
        pattern = p.get("pattern", "unstructured")
        if pattern == "n_m":
            ratio = n_m_ratio(p)
            if ratio is None:
                raise CompressionFailed(f"step {job.index + 1}: n_m pruning of {lj.name} needs n_m (e.g. '2:4')")
            opts["n_m_ratio"] = ratio
        else:
            opts["target_sparsity"] = float(need(p, "sparsity"))
            if pattern == "block":
                opts["block_size"] = int(need(p, "block_size"))
        configs[_key(lj.module)] = ModuleMagnitudePrunerConfig(**opts)
    pruner = MagnitudePruner(model, MagnitudePrunerConfig(global_config=None, module_name_configs=configs))
    model = pruner.prepare(inplace=True)
    pruner.step()
    return pruner.finalize(model, inplace=True)


@handles(ID, "joint_compression", api="MagnitudePruner, then PostTrainingPalettizer (zeros kept out of the LUT)")
@handles(ID, "joint_sparse_quantization", api="MagnitudePruner, then PostTrainingQuantizer (zeros kept)")
def _joint(model: Any, job: StepJob, ctx: Context | None = None) -> Any:
    """Prune, then palettize/quantize the rest, then put the zeros back.

    Core ML's joint formats keep pruned weights out of the LUT / grid (constexpr_lut_to_sparse,
    constexpr_sparse_blockwise_shift_scale); re-zeroing after k-means gives the torch model the
    same structure: the zeros plus at most 2^nbits other values.
    """
    import torch

    model = _magnitude_prune(model, job)
    masks = {}
    for lj in job.layers:
        w = getattr(model.get_submodule(lj.module) if lj.module else model, lj.param)
        masks[(lj.module, lj.param)] = w.detach() == 0
    if job.technique == "joint_compression":
        model = _post_training_palettize(model, job)
    else:
        model = _post_training_quantize(model, job)
    with torch.no_grad():
        for (module, param), mask in masks.items():
            getattr(model.get_submodule(module) if module else model, param).masked_fill_(mask, 0.0)
    return model


@handles(ID, "gptq", api="coremltools.optimize.torch.layerwise_compression.GPTQ")
@handles(ID, "sparsegpt", api="coremltools.optimize.torch.layerwise_compression.SparseGPT")
def _layerwise(model: Any, job: StepJob, ctx: Context) -> Any:
    """GPTQ / SparseGPT: coremltools runs them over the children of a Sequential model."""
    import torch
    from coremltools.optimize.torch.layerwise_compression import (LayerwiseCompressor,
                                                                  LayerwiseCompressorConfig,
                                                                  ModuleGPTQConfig, ModuleSparseGPTConfig)

    if not isinstance(model, torch.nn.Sequential):
        raise Unavailable(f"{job.technique} through coremltools needs an nn.Sequential model whose "
                          f"children run one after another (got {type(model).__name__})",
                          hint="use palettization/sensitive_kmeans, or linear_quantization for this model")
    batches, _ = _calibration(ctx, job.technique, int(job.params.get("calibration_samples", 128)))
    configs = {}
    for lj in job.layers:
        p = lj.params
        if job.technique == "gptq":
            opts = _quantizer_options(p)
            # coremltools' GPTQ names its grid by an unsigned dtype (uint4, uint8).
            cfg = ModuleGPTQConfig(weight_dtype=f"uint{int(p.get('nbits', 4))}", granularity=opts["granularity"],
                                   quantization_scheme=opts["quantization_scheme"],
                                   block_size=opts.get("block_size"))
        else:
            ratio = n_m_ratio(p)
            # weight_dtype defaults to uint8 in coremltools 9 (its docstring says float32): a
            # sparsity step must not quantize behind the plan's back, so ask for float32.
            cfg = (ModuleSparseGPTConfig(n_m_ratio=ratio, weight_dtype="float32") if ratio
                   else ModuleSparseGPTConfig(target_sparsity=float(p.get("sparsity", 0.5)), weight_dtype="float32"))
        configs[_key(lj.module)] = cfg
    children = [name for name, _ in model.named_children()]
    config = LayerwiseCompressorConfig(layers=children, global_config=None, module_name_configs=configs,
                                       calibration_nsamples=len(batches))
    data = [b[0][0] for b in batches]
    return LayerwiseCompressor(model, config).compress(dataloader=data, device="cpu", inplace=True)


BACKEND = CoremltoolsTorch()

from compressadvise.backends import coremltools_train  # noqa: E402,F401  (registers the training handlers)
