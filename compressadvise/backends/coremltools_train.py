"""coremltools, torch side, training-aware: DKM palettization, QAT, gradual magnitude pruning;
and W8A8 activation quantization calibrated on samples (LinearQuantizer without training).

Each handler prepares the model with coremltools' compressor, trains it with the user's
training hook (`compressadvise.backends.training.fit`: progress, checkpoints, resume), then finalizes.
The result has the same form as the post-training handlers' (dense float weights snapped to
the LUT / grid / zeros plus coremltools' compression metadata), so conversion, the read-back
check and the planned-vs-built gate are the same code.
"""
from __future__ import annotations

import copy
from typing import Any

from compressadvise.backends import Context, StepJob, handles, need
from compressadvise.backends.coremltools_torch import ID, _key, _palettizer_options
from compressadvise.errors import CompressionFailed, Unavailable

TRAINED = ("dkm", "qat", "gradual_pruning")


def _fit(model: Any, job: StepJob, ctx: Context, on_step: Any) -> None:
    from compressadvise.backends.training import fit

    run = ctx.training
    if run is None:
        raise Unavailable(f"plan step {job.index + 1} ({job.technique}) trains the model and no training data "
                          "was given", hint="pass --train module:function (your loader and loss) or --train bundled")
    steps = _steps(job, ctx)
    result = fit(model, run.spec, steps=steps, lr=float(need(job.params, "learning_rate")),
                 label=f"plan step {job.index + 1} ({job.technique})", on_step=on_step, progress=ctx.progress,
                 checkpoints=run.checkpoints, index=job.index,
                 every=max(1, int(job.params.get("checkpoint_every", 50))))
    run.results[job.index] = {"steps": result.steps, "resumed_from": result.resumed_from,
                              "first_loss": result.first_loss, "last_loss": result.last_loss,
                              "seconds": result.seconds, "data": run.spec.source}


def _steps(job: StepJob, ctx: Context) -> int:
    """Optimizer steps of the run: the training hook's `steps`, else the technique's."""
    given = ctx.training.spec.steps if ctx.training is not None else None
    return int(given or need(job.params, "steps"))


def _prepare_train_finalize(compressor: Any, job: StepJob, ctx: Context) -> Any:
    """coremltools' training-time protocol: prepare, train calling step() after each optimizer step, finalize."""
    prepared = compressor.prepare(inplace=True)
    _fit(prepared, job, ctx, compressor.step)
    return compressor.finalize(prepared, inplace=True)


@handles(ID, "dkm", api="coremltools.optimize.torch.palettization.DKMPalettizer (trained with --train)")
def _dkm(model: Any, job: StepJob, ctx: Context) -> Any:
    from coremltools.optimize.torch.palettization import (DKMPalettizer, DKMPalettizerConfig,
                                                          ModuleDKMPalettizerConfig)

    configs = {}
    for lj in job.layers:
        opts = _palettizer_options(lj.params)
        opts.pop("lut_dtype", None)  # DKM's lut_dtype is a training dtype, not the stored LUT's
        configs[_key(lj.module)] = ModuleDKMPalettizerConfig(**opts, weight_threshold=0, milestone=0)
    return _prepare_train_finalize(DKMPalettizer(model, DKMPalettizerConfig(global_config=None,
                                                                             module_name_configs=configs)), job, ctx)


@handles(ID, "gradual_pruning", api="coremltools.optimize.torch.pruning.MagnitudePruner + PolynomialDecayScheduler")
def _gradual_prune(model: Any, job: StepJob, ctx: Context) -> Any:
    from coremltools.optimize.torch.pruning import (MagnitudePruner, MagnitudePrunerConfig,
                                                    ModuleMagnitudePrunerConfig, PolynomialDecayScheduler)

    steps = _steps(job, ctx)  # the run's length, which the schedule's ramp is a share of
    # Sparsity rises from 0 along a cubic curve, updated every `update_every` steps, and reaches
    # the target at `ramp` of the run; the rest fine-tunes at the target sparsity.
    end = max(2, int(steps * float(need(job.params, "ramp"))))
    every = max(1, int(need(job.params, "update_every")))
    configs = {}
    for lj in job.layers:
        p = lj.params
        opts: dict[str, Any] = {"scheduler": PolynomialDecayScheduler(update_steps=list(range(0, end + 1, every))),
                                "target_sparsity": float(need(p, "sparsity")), "param_name": lj.param}
        if p.get("pattern") == "block":
            opts["block_size"] = int(need(p, "block_size"))
        configs[_key(lj.module)] = ModuleMagnitudePrunerConfig(**opts)
    return _prepare_train_finalize(MagnitudePruner(model, MagnitudePrunerConfig(global_config=None,
                                                                              module_name_configs=configs)), job, ctx)


@handles(ID, "qat", api="coremltools.optimize.torch.quantization.LinearQuantizer (weights; trained with --train)")
def _qat(model: Any, job: StepJob, ctx: Context) -> Any:
    """Fake-quantized weights during training; the learned grid written back into `model`.

    LinearQuantizer traces the model with torch.fx and fuses conv+activation pairs, so its result
    renames modules (`dw` becomes `dw.0`) and its artefact does not export. The trained weights,
    snapped to the learned grid, and coremltools' quantization metadata are copied back into the
    original module tree: the rest of apply sees what PostTrainingQuantizer would have left."""
    import torch
    from coremltools.optimize.torch.quantization import ModuleLinearQuantizerConfig

    def config(lj: Any) -> Any:
        return ModuleLinearQuantizerConfig(
            weight_dtype=f"qint{int(need(lj.params, 'nbits'))}", activation_dtype=torch.float32,
            quantization_scheme="affine" if lj.params.get("mode") == "linear" else "symmetric")

    # coremltools 9 gives a fused conv+activation pair its default 8-bit config whatever its
    # module-name config says (measured): the step's setting goes in global_config, and every
    # module outside the step is named with None.
    settings = {(lj.params.get("nbits"), lj.params.get("mode")) for lj in job.layers}
    if len(settings) > 1:
        raise Unavailable(f"plan step {job.index + 1} (qat): its layers ask for {len(settings)} different settings; "
                          "coremltools' LinearQuantizer applies one setting per run here", hint="split the step by setting")
    example = ctx.example_inputs
    if example is None:
        raise CompressionFailed(f"plan step {job.index + 1} (qat): LinearQuantizer traces the model and needs an "
                                "example input", hint="pass --input-shape or --samples")
    quantizer, prepared = _linear_quantizer(model, job, config(job.layers[0]), tuple(example),
                                            "use dkm (palettization, trained in place) or linear_quantization")
    _fit(prepared, job, ctx, quantizer.step)
    finalized = quantizer.finalize(prepared, inplace=True)
    _write_back(model, finalized, job)
    return model


def _linear_quantizer(model: Any, job: StepJob, config: Any, example: tuple, hint: str) -> tuple[Any, Any]:
    """LinearQuantizer over a copy of `model` with `config` for the step's layers, every other module
    it supports named with None (a None global config would quantize them), prepared (fx-traced)."""
    from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig

    from compressadvise.backends.coremltools_torch import _supported_modules

    planned = {lj.module for lj in job.layers}
    names = {_key(name): None for name, module in model.named_modules()
             if name and name not in planned and isinstance(module, _supported_modules("qat"))}
    quantizer = LinearQuantizer(copy.deepcopy(model), LinearQuantizerConfig(global_config=config,
                                                                            module_name_configs=names))
    try:
        return quantizer, quantizer.prepare(example_inputs=example, inplace=True)
    except Exception as e:
        raise Unavailable(f"plan step {job.index + 1} ({job.technique}): LinearQuantizer could not trace the model "
                          f"with torch.fx ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                          hint=hint) from e


def _write_back(model: Any, finalized: Any, job: StepJob, layers: list[Any] | None = None,
                trained: bool = True) -> None:
    """Trained parameters into `model` by name (a fused `name.0` too); the planned weights (or
    `layers`) snapped to their learned grid, with the quantization metadata coremltools registered."""
    import torch
    from coremltools.optimize.torch._utils.metadata_utils import CompressionMetadata

    state = finalized.state_dict()
    with torch.no_grad():
        for name, param in model.named_parameters() if trained else ():
            module, _, leaf = name.rpartition(".")
            source = next((k for k in (name, f"{module}.0.{leaf}") if k in state), None)
            if source is not None and state[source].shape == param.shape:
                param.copy_(state[source].to(param.dtype))
        for lj in job.layers if layers is None else layers:
            fused = next((m for m in (lj.module, f"{lj.module}.0") if f"{m}.{lj.param}" in state), None)
            prefix = f"{fused}." if fused else ""
            meta = CompressionMetadata.from_state_dict({k[len(prefix):]: v for k, v in state.items()
                                                        if k.startswith(prefix + "_COREML_/")})
            if fused is None or lj.param not in meta:
                raise CompressionFailed(f"plan step {job.index + 1} (qat): LinearQuantizer left {lj.tensor} "
                                        "without quantization parameters")
            m = meta[lj.param]
            if int(m.quantization_n_bits) != int(need(lj.params, "nbits")):
                raise CompressionFailed(f"plan step {job.index + 1} (qat): LinearQuantizer trained {lj.tensor} at "
                                        f"{int(m.quantization_n_bits)} bits, the plan asks for {lj.params['nbits']}")
            target = model.get_submodule(lj.module)
            w = getattr(target, lj.param)
            w.copy_(_snap(w, m))
            m.register(target)


def _snap(w: Any, m: Any) -> Any:
    """w on the grid (q - zero_point) * scale, q in the signed n-bit range: the values that ship."""
    import torch

    n = int(m.quantization_n_bits)
    scale = m.quantization_scale.to(w.dtype)
    scale = scale.reshape(scale.shape + (1,) * (w.dim() - scale.dim()))
    zp = torch.zeros_like(scale) if m.zero_point is None else m.zero_point.to(w.dtype).reshape(scale.shape)
    q = torch.clamp(torch.round(w / scale) + zp, -(2 ** (n - 1)), 2 ** (n - 1) - 1)
    return (q - zp) * scale


@handles(ID, "activation_quantization",
         api="coremltools.optimize.torch.quantization.LinearQuantizer (calibration: observers on --samples, no training)")
def _w8a8(model: Any, job: StepJob, ctx: Context) -> Any:
    """W8A8 from the torch side: LinearQuantizer's observers run over the calibration samples, then
    the int8 weights (snapped, with their metadata) and each layer's input quantization (a
    quantize/dequantize pair with the calibrated scale, as a forward pre-hook) go into `model`'s
    own module tree; the converter turns both into Core ML's quantize/dequantize and int8 weight ops."""
    import torch
    from coremltools.optimize.torch.quantization import ModuleLinearQuantizerConfig

    from compressadvise.backends.coremltools_torch import _calibration

    batches, _ = _calibration(ctx, job.technique, int(need(job.params, "calibration_samples")))
    config = ModuleLinearQuantizerConfig(weight_dtype="qint8", activation_dtype=torch.quint8,
                                         quantization_scheme="symmetric")
    quantizer, prepared = _linear_quantizer(model, job, config, tuple(batches[0][0]),
                                            "W8A8 through the torch side needs an fx-traceable model; weight-only "
                                            "int8 works for any")
    prepared.eval()
    with torch.no_grad():
        for inputs, _ in batches:
            prepared(*inputs)
    finalized = quantizer.finalize(prepared, inplace=True)
    # The int8 weights, where no weights step of the plan compressed them already (that step owns
    # them: ACT002's int8, or a LUT); coremltools' metadata on a layer marks an earlier step.
    fresh = [lj for lj in job.layers
             if not hasattr(model.get_submodule(lj.module), "_COREML_/weight/compression_type")]
    _write_back(model, finalized, job, layers=fresh, trained=False)
    for module, (scale, zero_point) in _input_quantization(finalized, job).items():
        target = model.get_submodule(module)
        target.register_buffer("_act_scale", scale.detach().clone())
        target.register_buffer("_act_zero_point", zero_point.detach().clone())
        target.register_forward_pre_hook(_QuantizeInput())
    return model


class _QuantizeInput:
    """Forward pre-hook: the layer's input through quantize_per_tensor (quint8) and back, with the
    scale and zero-point calibrated for it (buffers on the layer, so they travel with the artefact)."""

    def __call__(self, module: Any, args: tuple) -> tuple:
        import torch

        x = torch.quantize_per_tensor(args[0], float(module._act_scale), int(module._act_zero_point), torch.quint8)
        return (x.dequantize(), *args[1:])


def _input_quantization(finalized: Any, job: StepJob) -> dict[str, tuple[Any, Any]]:
    """Per layer module, the (scale, zero_point) of the quantize_per_tensor feeding it in the finalized graph."""
    import torch

    found: dict[str, tuple[Any, Any]] = {}
    planned = {lj.module for lj in job.layers}
    for node in finalized.graph.nodes:
        if node.op != "call_module" or str(node.target) not in planned or not node.args:
            continue
        deq = node.args[0]
        quant = deq.args[0] if getattr(deq, "target", None) == "dequantize" and deq.args else None
        if getattr(quant, "target", None) is not torch.quantize_per_tensor:
            continue
        scale, zero_point = (getattr(finalized, str(a.target)) for a in quant.args[1:3])
        found[str(node.target)] = (scale, zero_point)
    missing = [lj.name for lj in job.layers if lj.module not in found]
    if missing:
        raise CompressionFailed(f"plan step {job.index + 1} (activation_quantization): LinearQuantizer left no "
                                f"input quantization for {', '.join(missing[:6])}")
    return found
