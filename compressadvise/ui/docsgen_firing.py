"""Docs generator: the rules' firing examples, from a deterministic search over documentation scenarios."""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from compressadvise.errors import CompressAdviseError


def encoder_model():
    """Documentation scenario: a small transformer encoder classifier (token ids in, 4 classes)."""
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self, vocab: int = 2000, d: int = 128, layers: int = 2, classes: int = 4) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            layer = nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.classifier = nn.Linear(d, classes)

        def forward(self, ids):
            return self.classifier(self.encoder(self.embed(ids)).mean(1))

    torch.manual_seed(0)
    return Encoder().eval(), (torch.randint(0, 2000, (1, 16)),)


def decoder_lm():
    """Documentation scenario: a 5M-parameter decoder LM with a tied embedding / LM head."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
            self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            h = self.ln1(x)
            att = self.q_proj(h) @ self.k_proj(h).transpose(1, 2) / h.shape[-1] ** 0.5
            mask = torch.ones(att.shape[-2:], dtype=torch.bool).triu(1)
            x = x + self.o_proj(att.masked_fill(mask, float("-inf")).softmax(-1) @ self.v_proj(h))
            return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))

    class DecoderLM(nn.Module):
        def __init__(self, vocab: int = 8000, d: int = 256, layers: int = 4) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, d)
            self.layers = nn.ModuleList(Block(d) for _ in range(layers))
            self.norm = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.embed_tokens.weight

        def forward(self, ids):
            x = self.embed_tokens(ids)
            for block in self.layers:
                x = block(x)
            return self.lm_head(self.norm(x))

    torch.manual_seed(0)
    return DecoderLM().eval(), (torch.randint(0, 8000, (1, 16)),)


def mlp_model():
    """Documentation scenario: a fully connected classifier (784 -> 512 -> 200 -> 10; 200 output
    channels do not divide into groups of 16, as real layer widths often do not)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 200),
                          nn.ReLU(), nn.Linear(200, 10))
    return model.eval(), (torch.randn(1, 1, 28, 28),)


def quirky_mlp():
    """Documentation scenario: an MLP with the weight problems analysis looks for: a layer
    already 60% zeros (pruned), a layer with heavy-tailed weights (a few large outliers) and
    one NaN weight."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        w0 = model[0].weight
        w0[torch.rand_like(w0) < 0.6] = 0.0
        w2 = model[2].weight
        w2.view(-1)[torch.randperm(w2.numel())[:20]] = 2.0
        model[4].weight[0, 0] = float("nan")
    return model.eval(), (torch.randn(1, 256),)


# Named through compressadvise.ui.docsgen (which re-exports them): the commands on the rule pages name that module.
_HOME = f"{__package__}.docsgen"
SCENARIO_MODELS = [None, f"{_HOME}:encoder_model", f"{_HOME}:decoder_lm", f"{_HOME}:mlp_model",
                   f"{_HOME}:quirky_mlp"]
# (constraints, size ratio): a size budget is the model's fp16 size divided by the ratio (0: none).
SCENARIO_BUDGETS: list[tuple[dict[str, Any], float]] = [
    ({}, 0), ({"data": "calibration"}, 0), ({"data": "training"}, 0),
    ({}, 4), ({"data": "calibration"}, 4), ({"data": "training", "max_accuracy_drop": 1.0}, 4),
    ({}, 8), ({"data": "training"}, 8), ({"max_latency_ms": 1.0}, 0),
    ({"max_latency_ms": 1.0, "data": "training"}, 0), ({"max_latency_ms": 1.0}, 4),
    ({"max_accuracy_drop": 0.5}, 2), ({}, 2.5),
    ({"data": "calibration", "max_latency_ms": 1.0, "max_accuracy_drop": 0.5}, 2),
]


def _scenario_command(model: str | None, target: Any, os_major: int, c: dict[str, Any]) -> str:
    words = ["compressadvise", "recommend"] + ([model] if model else []) + ["--target", target.name]
    if os_major != target.default_os:
        words += ["--os", str(os_major)]
    for key, value in c.items():
        words += ["--" + key.replace("_", "-"), f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(words)


def _scenarios(k: Any, reports: dict) -> Any:
    """(model, target, OS, constraints) from the simplest outwards: budgets, then models, then targets."""
    for extra, ratio in SCENARIO_BUDGETS:
        for model in SCENARIO_MODELS:
            c = dict(extra)
            if ratio:
                c["max_size_mb"] = round(reports[model].total_bytes_fp16 / 1e6 / ratio, 3)
            for target in sorted(k.targets.values(), key=lambda t: t.name):
                for os_major in dict.fromkeys([target.default_os, target.min_os]):
                    yield model, target, os_major, c


LAYER_PROBES = 150  # at most this many extra `recommend` runs look for layer rules' examples


def _likely_steps(k: Any, compress: list, base: dict) -> list[tuple[str, dict]]:
    """(rule code, step facts) of the compress rules likely to win each slot: the highest rank
    among those matching, skipping techniques the target cannot run. A cheap stand-in for the
    plan's steps, used only to skip scenarios that cannot teach anything new; every claim on a
    page comes from a real `recommend` run."""
    from compressadvise.plan.engine import missing_modes
    from compressadvise.knowledge.facts import step_facts

    supported = base["target"]["supports"]
    best: dict[str, tuple[str, dict]] = {}
    for cr in compress:  # already in rank order
        tech = cr.rule.action.technique
        slot = k.techniques[tech].slot
        if slot in best or not cr.condition(base):
            continue
        params = {**k.techniques[tech].defaults(), **cr.rule.action.params}
        if not missing_modes(k, tech, params, supported):
            best[slot] = (cr.code, step_facts(params, tech, slot))
    return [best[slot] for slot in sorted(best)]


def _may_fire(conjuncts: list, base: dict, steps: list[tuple[str, dict]]) -> bool:
    """Whether a layer rule's conjuncts that do not read layer facts hold for some likely step."""
    for _, sf in steps:
        ctx = {**base, "step": sf}
        try:
            if all(prog.execute(ctx) is True for prog in conjuncts):
                return True
        except Exception:  # noqa: BLE001 - e.g. a modulus by zero: cannot rule it out
            return True
    return False


def firing_examples() -> dict[str, dict[str, Any]]:
    """For each rule, the first documentation scenario where the real engine fires it.

    Scenarios run from the simplest (bundled example, no budgets, default OS) outwards, so a
    rule's example is the least contrived one that triggers it. Each comes with the
    `compressadvise recommend` command that reproduces it. A rule that never fires keeps the
    first scenario where it matched but lost (outranked, or unsupported by the target): that
    tells its author which rule stands in its way.

    A full `recommend` costs tens of milliseconds, so scenarios are pruned, deterministically.
    One runs when a model rule still without an example matches its facts (a rule seen losing
    twice stops asking), or when a layer rule still without an example could fire in it (its
    conjuncts that do not read layer facts hold for one of the likely steps) and the model,
    likely steps and the target/constraint facts layer rules read are new (at most
    LAYER_PROBES such runs). Advice rules that already have their example are left out of the
    runs: they change neither steps nor layer decisions.
    """
    from compressadvise.model.analysis import analyze
    from compressadvise.measure.placement import placement_facts
    from compressadvise.plan.engine import constraint_facts, model_facts, rule_rank, target_facts
    from compressadvise.knowledge.base import load_knowledge
    from compressadvise.model.loading import load_model
    from compressadvise.knowledge.schema import Constraints

    k = load_knowledge()
    reports = {m: analyze(load_model(m)) for m in SCENARIO_MODELS}
    mfacts = {m: model_facts(r) for m, r in reports.items()}
    model_rules = [cr for cr in k.rules.values() if cr.rule.scope == "model"]
    compress = sorted((cr for cr in model_rules if cr.rule.action.kind == "compress"), key=rule_rank)
    layer_rules = [cr for cr in k.rules.values() if cr.rule.scope == "layer"]
    nonlayer, read = _layer_probe_inputs(layer_rules)
    found: dict[str, dict[str, Any]] = {}
    losses: dict[str, int] = {}
    seen: set = set()
    probes = 0
    for model, target, os_major, c in _scenarios(k, reports):
        open_codes = {code for code in k.rules if found.get(code, {}).get("status") != "fired"}
        if not open_codes:
            break
        base = {"model": mfacts[model], "target": target_facts(target, os_major),
                "constraints": constraint_facts(Constraints(**c), reports[model]),
                "placement": placement_facts(reports[model], target)}
        wanted = any(cr.code in open_codes and losses.get(cr.code, 0) < 2 and cr.condition(base)
                     for cr in model_rules)
        steps = _likely_steps(k, compress, base)
        key = (model, tuple(code for code, _ in steps),
               json.dumps(sorted((ns, f, base[ns].get(f)) for ns, f in read)))
        if not wanted and probes < LAYER_PROBES and key not in seen:
            wanted = any(cr.code in open_codes and _may_fire(nonlayer[cr.code], base, steps)
                         for cr in layer_rules)
            probes += wanted
        if not wanted:
            continue
        seen.add(key)
        plan = _recommend(k, reports[model], target, os_major, c, open_codes)
        if plan is None:
            continue
        scenario = {"command": _scenario_command(model, target, os_major, c),
                    "model": reports[model].source, "family": reports[model].family}
        _record_trace(plan.trace, open_codes, scenario, found, losses)
    return found


def _recommend(k: Any, report: Any, target: Any, os_major: int, c: dict[str, Any], open_codes: set[str]) -> Any:
    """A real `recommend` run of one scenario (None when the engine refuses it), with the advice
    rules that already have their example left out."""
    from compressadvise.plan.engine import recommend

    rules = {code: cr for code, cr in k.rules.items()
             if code in open_codes or cr.rule.scope == "layer" or cr.rule.action.kind != "advise"}
    try:
        return recommend(report, target=target.name, os=os_major, constraints=c,
                         knowledge=dataclasses.replace(k, rules=rules))
    except CompressAdviseError:
        return None


def _layer_probe_inputs(layer_rules: list) -> tuple[dict[str, list], set[tuple[str, str]]]:
    """Per layer rule, its conjuncts that do not read layer facts; and the target and constraint
    facts that layer rules read directly (they belong in the probe key too)."""
    nonlayer = {cr.code: [prog for text, prog in cr.condition.conjuncts if "layer." not in text]
                for cr in layer_rules}
    read = {(ns, f) for cr in layer_rules for ns, f in re.findall(r"\b(target|constraints)\.(\w+)", cr.rule.when)}
    return nonlayer, read


def _record_trace(trace: list, open_codes: set[str], scenario: dict[str, Any], found: dict[str, dict[str, Any]],
                  losses: dict[str, int]) -> None:
    """Note, in `found`, the rules still without an example that a scenario's trace shows firing, or
    matching but losing (the first such scenario only; a later one that fires replaces it)."""
    for e in trace:
        if e.status == "not_matched" or e.code not in open_codes:
            continue
        if e.status != "fired":
            losses[e.code] = losses.get(e.code, 0) + 1
            if e.code in found:
                continue
        found[e.code] = {"status": e.status, **scenario, "detail": e.detail, "layers": e.layers}


def firing_markdown(code: str, firing: dict[str, dict[str, Any]] | None) -> str:
    lines = ["## Seen firing", ""]
    ex = (firing or {}).get(code)
    none = ("The generator's search over documentation scenarios (the bundled CNN, a small transformer "
            "encoder, a small decoder LM, an MLP and an MLP with pruned, heavy-tailed and NaN weights, on "
            "every target, with and without budgets and data) {what}")
    if ex is None:
        lines += [none.format(what="did not trigger this rule: it needs a model, target or plan unlike "
                                   "these (for example a hand-written plan or a team playbook's step), or "
                                   "no built-in rule proposes the step it reacts to."), ""]
        return "\n".join(lines) + "\n"
    layers = ex["layers"]
    shown = ", ".join(f"`{x}`" for x in layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
    detail = f"{ex['detail']}" + (f" (layers: {shown})" if layers else "")
    if ex["status"] != "fired":
        lines += [none.format(what="found no case where this rule decides. It matched, but did not win, in:"), ""]
    else:
        lines += [f"Generated by running the engine on `{ex['model']}` (family: {ex['family']}):", ""]
    lines += ["```text", f"$ {ex['command']}", "```", "", f"Trace: **{ex['status']}**: {detail}", ""]
    return "\n".join(lines) + "\n"
