"""Quality for language models: next-token agreement, KL and perplexity, overall and by position.

A language model's damage is not one number: quantization error can grow with the context (each
position attends to more compressed keys and values), so the metrics are given per bucket of
positions as well as overall. Found from the data, not from names: an integer input shaped
(N, T) and a float output shaped (N, T, V) with the same N and T are token ids and next-token
logits. Perplexity is teacher-forced: the logits at position t score the token at t + 1.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from compressadvise.measure.metrics import ResultModel

if TYPE_CHECKING:
    import torch

BUCKET_EDGES = (0, 8, 32, 128, 512, 2048, 8192)  # predicted positions [a, b): early context to long context


class PositionBucket(ResultModel):
    start: int = Field(description="first position (0-based) whose next token is predicted")
    stop: int = Field(description="one past the last position")
    tokens: int = Field(description="predictions in the bucket (sequences x positions)")
    next_token_agreement: float = Field(description="share of positions where both models' arg-max token is the same")
    kl_divergence: float = Field(description="mean KL(original || compressed) per position, nats")
    perplexity_original: float | None = None
    perplexity_compressed: float | None = None


class LanguageModelReport(ResultModel):
    label: Literal["measured"] = "measured"
    output: str = Field(description="the logits output")
    input_index: int = Field(description="which model input holds the token ids")
    sequences: int
    length: int = Field(description="tokens per sequence")
    next_token_agreement: float
    kl_divergence: float = Field(description="mean per position, nats")
    perplexity_original: float | None = Field(None, description="teacher-forced on the sample sequences")
    perplexity_compressed: float | None = None
    perplexity_change: float | None = Field(None, description="compressed / original - 1")
    buckets: list[PositionBucket] = []
    notes: list[str] = []


def find_lm(inputs: list["torch.Tensor"], outputs: dict[str, "torch.Tensor"]) -> tuple[int, str] | None:
    """(input index, output name) of token ids and next-token logits, or None."""
    for i, x in enumerate(inputs):
        if x.dim() != 2 or x.is_floating_point() or x.shape[1] < 2:
            continue
        for name, y in outputs.items():
            if y.dim() == 3 and y.is_floating_point() and tuple(y.shape[:2]) == tuple(x.shape) and y.shape[2] > 1:
                return i, name
    return None


def lm_report(inputs: list["torch.Tensor"], ref: dict[str, "torch.Tensor"],
              test: dict[str, "torch.Tensor"]) -> LanguageModelReport | None:
    """The language-model metrics, when the samples and outputs are token ids and logits."""
    found = find_lm(inputs, ref)
    if found is None or found[1] not in test:
        return None
    i, name = found
    ids, p, q = inputs[i], ref[name], test[name]
    per = _per_position(ids, p, q)
    notes = []
    if per["nll_p"] is None:
        notes.append(f"token ids reach {int(ids.max())} but the vocabulary has {p.shape[-1]} entries: no perplexity")
    rep = LanguageModelReport(output=name, input_index=i, sequences=int(ids.shape[0]), length=int(ids.shape[1]),
                              **_summary(per, slice(None)), notes=notes)
    if rep.perplexity_original and rep.perplexity_compressed:
        rep.perplexity_change = rep.perplexity_compressed / rep.perplexity_original - 1
    rep.buckets = [PositionBucket(start=a, stop=b, tokens=int(ids.shape[0]) * (b - a), **_summary(per, slice(a, b)))
                   for a, b in _buckets(int(ids.shape[1]))]
    return rep


def _per_position(ids: "torch.Tensor", p: "torch.Tensor", q: "torch.Tensor") -> dict[str, Any]:
    """Per (sequence, position) agreement, KL and, where the ids fit the vocabulary, the negative
    log-likelihood of the next token under each model (the last position has no next token).
    One sequence at a time: log-probabilities in float64 of a (N, T, vocabulary) batch at once
    would take gigabytes for a real vocabulary."""
    import torch

    fits = int(ids.min()) >= 0 and int(ids.max()) < p.shape[-1]
    rows: dict[str, list] = {"agree": [], "kl": [], "nll_p": [], "nll_q": []}
    for i in range(ids.shape[0]):
        lp, lq = torch.log_softmax(p[i].double(), -1), torch.log_softmax(q[i].double(), -1)
        rows["agree"].append((p[i].argmax(-1) == q[i].argmax(-1)).double())
        rows["kl"].append((lp.exp() * (lp - lq)).sum(-1))
        if fits:
            nxt = ids[i, 1:].long().unsqueeze(-1)
            rows["nll_p"].append(-lp[:-1].gather(-1, nxt).squeeze(-1))
            rows["nll_q"].append(-lq[:-1].gather(-1, nxt).squeeze(-1))
    return {k: torch.stack(v) if v else None for k, v in rows.items()}


def _summary(per: dict[str, Any], span: slice) -> dict[str, Any]:
    row = {"next_token_agreement": float(per["agree"][:, span].mean()), "kl_divergence": float(per["kl"][:, span].mean())}
    if per["nll_p"] is not None:
        p, q = per["nll_p"][:, span], per["nll_q"][:, span]  # ends one position earlier: no next token at the end
        if p.numel():
            row["perplexity_original"] = math.exp(float(p.mean()))
            row["perplexity_compressed"] = math.exp(float(q.mean()))
    return row


def _buckets(length: int) -> list[tuple[int, int]]:
    """Position ranges cut at the edges that fall inside the sequence, the last one open to its end."""
    edges = [e for e in BUCKET_EDGES if e < length] + [length]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
