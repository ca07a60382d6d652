"""torchao: `quantize_` with the config that fits the step, layer by layer via a filter.

CPU-capable here: int8 weight-only, int8 dynamic activation + int8 weight, intx weight-only
(stored unpacked: one int8 per weight whatever the bit width). Int4 weight-only, float8 and
torchao sparsity need CUDA kernels: they are refused before any work on a machine without them.
"""
from __future__ import annotations

from typing import Any

from compressadvise.backends import (Context, HandlerTable, LayerJob, StepJob, handles, import_quietly, need, quiet,
                                     run_handler)
from compressadvise.errors import Unavailable

ID = "torchao"

GPU_ONLY = {
    "int4_weight_only": "torchao's Int4WeightOnlyConfig packs weights for CUDA int4 kernels (tinygemm)",
    "float8": "torchao's float8 configs need a CUDA GPU with float8 support (compute capability 8.9+)",
    "pruning": "torchao's sparsify_ (2:4 semi-structured) needs CUDA sparse kernels",
    "semi_sparse": "torchao's sparsify_ (2:4 semi-structured) needs CUDA sparse kernels",
}


class Torchao(HandlerTable):
    id = ID
    side = "torch"

    def unavailable(self, job: StepJob, ctx: Context) -> str | None:
        if missing := self.no_handler(job):
            return missing
        try:
            import_quietly("torchao.quantization")
        except Unavailable as e:
            return str(e)
        if job.technique in GPU_ONLY:
            import torch

            if not torch.cuda.is_available():
                return f"{GPU_ONLY[job.technique]}; this machine has no CUDA GPU"
            if job.technique == "float8" and torch.cuda.get_device_capability() < (8, 9):
                return GPU_ONLY["float8"]
        return None

    def layer_support(self, job: StepJob, lj: LayerJob, module: Any) -> str | None:
        import torch

        if lj.param != "weight":
            return f"torchao quantizes module weights only, not {lj.tensor}"
        if type(module) is torch.nn.Linear:
            return None
        if isinstance(module, torch.nn.Embedding) and self._intx(job, lj.params):
            return None
        kind = type(module).__name__ if module is not None else "no module"
        if isinstance(module, torch.nn.Linear):  # e.g. MultiheadAttention's out_proj, used functionally
            return f"{kind} is called functionally by its parent; torchao's quantize_ cannot replace it"
        return f"{kind}: torchao's {job.technique} handles nn.Linear only"

    @staticmethod
    def _intx(job: StepJob, p: dict[str, Any]) -> bool:
        return job.technique == "intx_weight_only" or (job.technique == "linear_quantization"
                                                       and int(need(p, "nbits")) < 8)

    def config(self, job: StepJob, p: dict[str, Any]) -> Any:
        """The torchao config object for one layer's parameters."""
        import torch
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                          IntxWeightOnlyConfig)
        from torchao.quantization.granularity import PerAxis, PerGroup, PerRow, PerTensor
        from torchao.quantization.quant_primitives import MappingType

        gran = p.get("granularity", "per_channel")
        if self._intx(job, p):
            mapping = MappingType.ASYMMETRIC if p.get("mode") == "linear" else MappingType.SYMMETRIC
            return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{int(need(p, 'nbits'))}"),
                                        granularity=PerGroup(int(need(p, "block_size"))) if gran == "per_block"
                                        else PerAxis(0),
                                        mapping_type=mapping)
        if job.technique == "int8_dynamic":
            return Int8DynamicActivationInt8WeightConfig(
                granularity=PerTensor() if gran == "per_tensor" else PerRow())
        if job.technique in ("int8_weight_only", "linear_quantization"):
            g = (PerTensor() if gran == "per_tensor" else PerGroup(int(need(p, "block_size"))) if gran == "per_block"
                 else PerRow())
            return Int8WeightOnlyConfig(granularity=g)
        if job.technique == "int4_weight_only":
            from torchao.quantization import Int4WeightOnlyConfig

            return Int4WeightOnlyConfig(group_size=int(need(p, "block_size")))  # torchao calls the block a group
        if job.technique == "float8":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig

            return (Float8WeightOnlyConfig() if p.get("mode", "weight_only") == "weight_only"
                    else Float8DynamicActivationFloat8WeightConfig())
        raise Unavailable(f"torchao backend cannot map technique {job.technique}")

    def run(self, model: Any, job: StepJob, ctx: Context) -> Any:
        return run_handler(self.id, model, job, ctx)


QUANTIZE_APIS = {
    "int8_weight_only": "torchao.quantization.Int8WeightOnlyConfig",
    "int8_dynamic": "torchao.quantization.Int8DynamicActivationInt8WeightConfig",
    "intx_weight_only": "torchao.quantization.IntxWeightOnlyConfig",
    "linear_quantization": "torchao.quantization.Int8WeightOnlyConfig / IntxWeightOnlyConfig",
    "int4_weight_only": "torchao.quantization.Int4WeightOnlyConfig",
    "float8": "torchao.quantization.Float8WeightOnlyConfig / Float8DynamicActivationFloat8WeightConfig",
}


def _quantize(model: Any, job: StepJob, ctx: Context) -> Any:
    """`quantize_` once per distinct config, each limited to its layers by a filter."""
    from torchao.quantization import quantize_

    if job.technique in GPU_ONLY:  # CUDA kernels: quantize on the GPU (untested without one)
        model = model.cuda()
    groups: dict[str, tuple[Any, set[str]]] = {}
    for lj in job.layers:
        cfg = BACKEND.config(job, lj.params)
        groups.setdefault(repr(cfg), (cfg, set()))[1].add(lj.module)
    with quiet():
        for cfg, names in groups.values():
            quantize_(model, cfg, filter_fn=lambda mod, fqn, names=names: fqn in names)
    return model


for _technique, _api in QUANTIZE_APIS.items():
    handles(ID, _technique, api=_api)(_quantize)


@handles(ID, "pruning", api="torchao.sparsity.sparsify_")
@handles(ID, "semi_sparse", api="torchao.sparsity.sparsify_ (semi_sparse_weight)")
def _sparsify(model: Any, job: StepJob, ctx: Context) -> Any:  # reached only with CUDA (see unavailable)
    from torchao.sparsity import semi_sparse_weight, sparsify_

    names = {lj.module for lj in job.layers}
    model = model.cuda()  # semi-structured sparse kernels are CUDA-only (untested without a GPU)
    with quiet():
        sparsify_(model, semi_sparse_weight(), filter_fn=lambda mod, fqn: fqn in names)
    return model


BACKEND = Torchao()
