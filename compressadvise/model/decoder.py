"""A decoder's KV cache: the runtime memory that grows with the context, beside the weights.

Generating text keeps every layer's keys and values for every token so far. At a context of C
tokens the cache holds 2 (keys, values) x layers x KV heads x head dim x C values: for a 1.1B
decoder at 2,048 tokens about as much as its 4-bit weights. Compressing the weights does not
shrink it, so a memory budget has to count it. The shape comes from the model's own config
(config.json of a Hugging Face folder, or an eager transformers model's `config`), read as data;
only causal language models (`*ForCausalLM`, `*LMHeadModel`) have one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

KV_BYTES = 2  # fp16 keys and values: what Core ML and torch keep by default


class KVShape(BaseModel):
    layers: int
    kv_heads: int = Field(description="key/value heads (grouped-query attention shares them across query heads); "
                                      "the most of any layer when they differ by layer")
    head_dim: int
    max_context: int | None = Field(None, description="the model's position limit, when its config says")
    heads: int | None = Field(None, description="query heads (the attention's width is heads x head dim)")
    kv_heads_per_layer: list[int] | None = Field(
        None, description="key/value heads of each layer, when they differ by layer (OpenELM's layer-wise scaling)")
    heads_per_layer: list[int] | None = Field(None, description="query heads of each layer, when they differ")
    source: str = Field(description="where the shape came from")

    def kv_heads_of(self) -> list[int]:
        """Each layer's key/value heads."""
        return list(self.kv_heads_per_layer or [self.kv_heads] * self.layers)

    def query_heads_total(self) -> int:
        """Query heads summed over layers: the attention's MACs per query per key / head dim."""
        if self.heads_per_layer:
            return sum(self.heads_per_layer)
        return self.layers * (self.heads or self.kv_heads)

    def bytes_at(self, context: int, bytes_per_value: int = KV_BYTES) -> int:
        """Cache bytes at a context of `context` tokens (batch 1): keys and values of every layer's heads."""
        return 2 * sum(self.kv_heads_of()) * self.head_dim * context * bytes_per_value

    def heads_words(self) -> str:
        """The KV heads in words, for a basis: '16 layers x 8 KV heads', or with heads by layer
        "16 layers' KV heads (3..5 by layer, 63 in all)"."""
        if not self.kv_heads_per_layer:
            return f"{self.layers} layers x {self.kv_heads} KV heads"
        per = self.kv_heads_per_layer
        return f"{self.layers} layers' KV heads ({min(per)}..{max(per)} by layer, {sum(per)} in all)"


def _first_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        v = cfg.get(key)
        if type(v) is int and v > 0:
            return v
    return None


def _per_layer(cfg: dict[str, Any], layers: int | None, *keys: str) -> list[int] | None:
    """A size the config lists once per layer (OpenELM: num_kv_heads, num_query_heads), else None."""
    for key in keys:
        v = cfg.get(key)
        if isinstance(v, list) and v and len(v) == layers and all(type(x) is int and x > 0 for x in v):
            return list(v)
    return None


def from_config(cfg: dict[str, Any], source: str) -> KVShape | None:
    """The cache shape from a transformers config dict (None: not a causal LM, or sizes missing). Sizes
    by any of the common names; per-layer lists (OpenELM's layer-wise heads) are kept per layer."""
    archs = cfg.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return None
    layers = _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "num_transformer_layers")
    kv_list = _per_layer(cfg, layers, "num_key_value_heads", "num_kv_heads")
    q_list = _per_layer(cfg, layers, "num_attention_heads", "num_query_heads")
    heads = _first_int(cfg, "num_attention_heads", "n_head", "num_query_heads") or (max(q_list) if q_list else None)
    hidden = _first_int(cfg, "hidden_size", "n_embd", "d_model", "model_dim")
    kv_heads = (max(kv_list) if kv_list else _first_int(cfg, "num_key_value_heads", "num_kv_heads")) or heads
    head_dim = _first_int(cfg, "head_dim") or (hidden // heads if hidden and heads and not q_list else None)
    if not (layers and kv_heads and head_dim):
        return None
    uniform = kv_list is None or len(set(kv_list)) == 1
    return KVShape(layers=layers, kv_heads=kv_heads, head_dim=head_dim, heads=heads,
                   kv_heads_per_layer=None if uniform else kv_list,
                   heads_per_layer=q_list if q_list and len(set(q_list)) > 1 else None,
                   max_context=_first_int(cfg, "max_position_embeddings", "n_positions", "max_sequence_length",
                                          "max_context_length"),
                   source=source)


def kv_shape(model: Any) -> KVShape | None:
    """A loaded model's cache shape: its module's config, else its folder's config.json."""
    config = getattr(getattr(model, "module", None), "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = config.to_dict()
        if not cfg.get("architectures"):  # a model built in code: its class names what it is
            cfg["architectures"] = [type(model.module).__name__]
        return from_config(cfg, "the model's config")
    folder = Path(str(getattr(model, "source", "")))
    if folder.is_dir() and (folder / "config.json").is_file():
        from compressadvise.model.hf import CONFIG_LIMIT, _read_json

        try:
            return from_config(_read_json(folder / "config.json", CONFIG_LIMIT, "config"), "config.json")
        except Exception:  # an unreadable config was reported when the model loaded
            return None
    return None
