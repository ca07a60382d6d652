"""Load and validate the knowledge base: techniques/, targets/ and playbooks/ (YAML).

Everything is checked on load (schema, cross references, condition compilation and type
checks) and every problem is reported as `file:line: rule CODE: message`. Importing this
module does not import torch, so `rules`, `explain` & co. start fast.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from compressadvise import backends  # the registry only: no backend library is imported
from compressadvise.errors import InvalidKnowledge, did_you_mean
from compressadvise.knowledge.expressions import Condition, ExpressionError, compile_condition, compile_value
from compressadvise.knowledge.facts import LAYER_SCOPE, MODEL_SCOPE, NAMESPACES, OUTCOME_SCOPE
from compressadvise.knowledge.schema import Playbook, Rule, Target, Technique
from compressadvise.knowledge.yamlio import line_of, read_yaml, validate

KINDS = ("techniques", "targets", "playbooks")
SCOPES = {"model": MODEL_SCOPE, "layer": LAYER_SCOPE, "outcome": OUTCOME_SCOPE}
FACT_TYPE = {"int": "int", "float": "double", "str": "string", "bool": "bool"}  # parameter type -> fact type
PLACEHOLDER = re.compile(r"\{([a-z_]+)\.([a-z_]+)\}")  # `{namespace.fact}` in an outcome rule's message
THRESHOLD = re.compile(r"\bthreshold\.([A-Za-z_][A-Za-z0-9_]*)\b")  # `threshold.NAME` in a condition
SIZE_VARIABLES = {
    "n": "elements of the weight tensor",
    "rows": "output channels (weight.shape[0])",
    "cols": "elements per output channel (n / rows)",
    "nbits": "bits per stored weight (index bits for palettization)",
    "levels": "2^nbits: entries of one look-up table",
    "groups": "independent scale/LUT groups: 1 per-tensor, rows per-channel, "
    "rows/group_size per grouped channel, n/block_size per block",
    "lut_bytes": "bytes per LUT entry: 2 (fp16) or 1 (int8 LUT)",
    "per_channel_scale": "1 when a per-channel scale is stored beside the LUT, else 0",
    "zero_point": "1 when a zero-point is stored (asymmetric modes), else 0",
    "sparsity": "fraction of zeros after pruning (0 when no pruning step; a joint step's own sparsity)",
    "baseline": "bytes per uncompressed weight on the target (2 for fp16 Core ML)",
}


def knowledge_root() -> Path:
    """Where the built-in YAML lives: inside the wheel, or at the top of a source checkout."""
    here = Path(__file__).resolve().parents[1]  # the package directory
    packaged = here / "_knowledge"
    if (packaged / "playbooks").is_dir():
        return packaged
    return here.parent


@dataclass
class CompiledRule:
    rule: Rule
    playbook: str
    file: str
    line: int
    condition: Condition
    where: Condition | None = None  # layer selection of a compress action

    @property
    def code(self) -> str:
        return self.rule.code

    def specificity(self) -> int:
        return len(self.condition.conjuncts)


@dataclass
class Knowledge:
    techniques: dict[str, Technique] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)
    playbooks: dict[str, Playbook] = field(default_factory=dict)
    rules: dict[str, CompiledRule] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # name -> file
    size_programs: dict[str, Any] = field(default_factory=dict)
    requirement_programs: dict[str, list[tuple[str, Condition | None]]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # name -> value, from techniques' `thresholds`

    def rule(self, code: str) -> CompiledRule:
        code = code.upper()
        if code not in self.rules:
            close = fnmatch.filter(self.rules, code[:3] + "*")
            hint = (f"rules with that prefix: {', '.join(sorted(close)[:8])}" if close
                    else "`compressadvise rules` lists the codes; `explain` also takes a technique or target name")
            guess = difflib.get_close_matches(code, list(self.rules), n=1, cutoff=0.8)
            hint = f"did you mean {guess[0]}? " * bool(guess) + hint
            raise InvalidKnowledge(f"no rule with code {code}", hint=hint)
        return self.rules[code]

    def target(self, name: str) -> Target:
        if name not in self.targets:
            raise InvalidKnowledge(f"unknown target {name!r}", hint=did_you_mean(name, self.targets))
        return self.targets[name]

    def technique(self, name: str) -> Technique:
        if name not in self.techniques:
            raise InvalidKnowledge(f"unknown technique {name!r}", hint=did_you_mean(name, self.techniques))
        return self.techniques[name]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.y*ml") if p.suffix in (".yaml", ".yml")) if folder.is_dir() else []


def _read_named(k: Knowledge, path: Path, model: type, kind: str, known: dict) -> tuple[Any, Any]:
    """A technique or target file, validated, whose name is not taken yet (with its YAML lines)."""
    data, lines = read_yaml(path)
    obj = validate(model, data, str(path), lines)
    if obj.name in known:
        raise InvalidKnowledge(f"{path}:{line_of(lines, ('name',))}: {kind} {obj.name!r} "
                               f"already defined in {k.sources[kind + ':' + obj.name]}")
    return obj, lines


def _load_technique(k: Knowledge, path: Path) -> None:
    t, lines = _read_named(k, path, Technique, "technique", k.techniques)
    for pname, spec in t.parameters.items():
        if spec.default is not None and (msg := spec.check(pname, spec.default)):
            raise InvalidKnowledge(f"{path}:{line_of(lines, ('parameters', pname))}: default: {msg}")
    if t.size:
        sample = {v: 2.0 for v in SIZE_VARIABLES}
        try:
            k.size_programs[t.name] = compile_value(t.size.formula, sample)
        except ExpressionError as e:
            raise InvalidKnowledge(f"{path}:{line_of(lines, ('size', 'formula'))}: size formula: {e}") from None
    _check_backends(t, path, lines)
    reqs = []
    for i, req in enumerate(t.requires):
        cond = None
        if req.when:
            where = f"{path}:{line_of(lines, ('requires', i, 'when'))}"
            try:
                cond = compile_condition(req.when, ("step",), origin=f"{where}: technique {t.name}: requires.when")
            except ExpressionError as e:
                raise InvalidKnowledge(f"{where}: {e}") from None
        reqs.append((req.mode, cond))
    k.requirement_programs[t.name] = reqs
    _check_grid(t, path, lines)
    for tname, th in t.thresholds.items():
        if tname in k.thresholds:
            raise InvalidKnowledge(f"{path}:{line_of(lines, ('thresholds', tname))}: threshold {tname!r} already "
                                   f"defined in {k.sources['threshold:' + tname]}")
        k.thresholds[tname] = th.value
        k.sources["threshold:" + tname] = str(path)
    k.techniques[t.name] = t
    k.sources["technique:" + t.name] = str(path)


def _check_backends(t: Technique, path: Path, lines: dict[tuple, int]) -> None:
    """Every backend a technique names is registered (or `guidance`): the registry lists names
    without importing any backend library."""
    for i, impl in enumerate(t.backends):
        if impl.backend != backends.GUIDANCE and impl.backend not in backends.names():
            raise InvalidKnowledge(f"{path}:{line_of(lines, ('backends', i, 'backend'))}: technique {t.name}: "
                                   f"unknown backend {impl.backend!r}",
                                   hint=f"registered: {', '.join(sorted(backends.names()))} (or {backends.GUIDANCE})")


def _check_grid(t: Technique, path: Path, lines: Any) -> None:
    """Every search_grid entry names the technique's parameters with values they accept."""
    for i, entry in enumerate(t.search_grid):
        for pname, values in entry.items():
            where = f"{path}:{line_of(lines, ('search_grid', i, pname))}: search_grid"
            spec = t.parameters.get(pname)
            if spec is None:
                raise InvalidKnowledge(f"{where}: technique {t.name!r} has no parameter {pname!r}")
            for v in values if isinstance(values, list) else [values]:
                if msg := spec.check(pname, v):
                    raise InvalidKnowledge(f"{where}: {msg}")


def with_thresholds(k: Knowledge, text: str, where: str) -> str:
    """A condition with each `threshold.NAME` replaced by its value, so CEL sees a number and
    nothing at run time needs the threshold table."""
    def value(m: re.Match) -> str:
        if m.group(1) not in k.thresholds:
            raise InvalidKnowledge(f"{where}: unknown threshold {m.group(1)!r} "
                                   f"(known: {', '.join(sorted(k.thresholds)) or 'none'})")
        return repr(float(k.thresholds[m.group(1)]))
    return THRESHOLD.sub(value, text)


def _load_target(k: Knowledge, path: Path) -> None:
    t, lines = _read_named(k, path, Target, "target", k.targets)
    known = {*backends.names(), *backends.families()}  # a target may name a family: coremltools
    for i, name in enumerate(t.backends):
        if name not in known:
            raise InvalidKnowledge(f"{path}:{line_of(lines, ('backends', i))}: target {t.name}: unknown backend "
                                   f"{name!r}", hint=f"registered: {', '.join(sorted(known))}")
    k.targets[t.name] = t
    k.sources["target:" + t.name] = str(path)


def _check_action(k: Knowledge, rule: Rule, where: str) -> None:
    a = rule.action
    if a.kind == "compress" and (rule.scope != "model" or not a.technique):
        raise InvalidKnowledge(f"{where}: a compress action needs scope: model and a technique")
    if a.kind in ("override", "keep") and rule.scope != "layer":
        raise InvalidKnowledge(f"{where}: {a.kind} actions need scope: layer")
    if a.kind == "advise" and not a.message:
        raise InvalidKnowledge(f"{where}: an advise action needs a message")
    if rule.scope == "outcome":
        _check_outcome(rule, where)
    if rule.scope == "model":
        for ns, name in PLACEHOLDER.findall(a.message or ""):
            if ns not in MODEL_SCOPE or name not in NAMESPACES[ns]:
                raise InvalidKnowledge(f"{where}: message placeholder {{{ns}.{name}}} is not a model-scope fact")
    if a.technique:
        if a.technique not in k.techniques:
            raise InvalidKnowledge(f"{where}: unknown technique {a.technique!r} "
                                   f"(known: {', '.join(sorted(k.techniques))})")
        tech = k.techniques[a.technique]
        for pname, value in a.params.items():
            spec = tech.parameters.get(pname)
            if spec is None:
                raise InvalidKnowledge(f"{where}: technique {tech.name!r} has no parameter {pname!r} "
                                       f"(has: {', '.join(tech.parameters)})")
            if isinstance(value, str) and (m := PLACEHOLDER.fullmatch(value)):  # a fact of the layer decided
                fact = NAMESPACES.get(m.group(1), {}).get(m.group(2)) if m.group(1) in ("layer", "step") else None
                if rule.scope != "layer" or fact is None or fact.type != FACT_TYPE[spec.type]:
                    raise InvalidKnowledge(f"{where}: parameter {pname!r} = {value!r}: a placeholder must name a "
                                           f"layer or step fact of the parameter's type, in a layer rule")
                continue
            if msg := spec.check(pname, value):
                raise InvalidKnowledge(f"{where}: {msg}")
        if a.kind == "compress" and tech.guidance_only:
            raise InvalidKnowledge(f"{where}: {tech.name!r} is guidance only; use an advise action")
    elif a.params and a.kind == "override":
        raise InvalidKnowledge(f"{where}: an override with params must name its technique")


def _check_outcome(rule: Rule, where: str) -> None:
    """An outcome rule only advises, and its message names facts its scope has."""
    if rule.action.kind != "advise":
        raise InvalidKnowledge(f"{where}: outcome rules advise (the next move); got kind {rule.action.kind!r}")
    for ns, name in PLACEHOLDER.findall(rule.action.message or ""):
        if ns not in OUTCOME_SCOPE or name not in NAMESPACES[ns]:
            raise InvalidKnowledge(f"{where}: message placeholder {{{ns}.{name}}} is not an outcome-scope fact")


def _load_playbook(k: Knowledge, path: Path, origin: str) -> None:
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise InvalidKnowledge(f"{path}:1: a playbook must be a mapping with 'playbook' and 'rules'")
    # Validate rule by rule so a message can name the rule code.
    raw_rules = data.get("rules")
    header = {key: v for key, v in data.items() if key != "rules"}
    validate(Playbook, {**header, "rules": []}, str(path), lines)
    if not isinstance(raw_rules, list) or not raw_rules:
        raise InvalidKnowledge(f"{path}:{line_of(lines, ('rules',))}: 'rules' must be a non-empty list")
    rules: list[Rule] = []
    for i, raw in enumerate(raw_rules):
        code = raw.get("code", f"#{i + 1}") if isinstance(raw, dict) else f"#{i + 1}"
        rule = validate(Rule, raw, str(path), lines, prefix=("rules", i), context=f"rule {code}")
        where = f"{path}:{line_of(lines, ('rules', i))}: rule {rule.code}"
        if rule.code in k.rules:
            prev = k.rules[rule.code]
            raise InvalidKnowledge(f"{where}: duplicate rule code (first defined at {prev.file}:{prev.line})")
        _check_action(k, rule, where)
        scope = SCOPES[rule.scope]
        when_at = f"{path}:{line_of(lines, ('rules', i, 'when'))}: rule {rule.code}"
        try:  # origin: a runtime failure (division by zero...) names the rule and its line too
            cond = compile_condition(with_thresholds(k, rule.when, when_at), scope, origin=when_at)
        except ExpressionError as e:
            raise InvalidKnowledge(f"{when_at}: {e}") from None
        sel = None
        if rule.action.layers and rule.action.layers.where:
            ln = line_of(lines, ("rules", i, "action", "layers", "where"))
            sel_at = f"{path}:{ln}: rule {rule.code}: layers.where"
            try:
                sel = compile_condition(with_thresholds(k, rule.action.layers.where, sel_at), LAYER_SCOPE,
                                        origin=sel_at)
            except ExpressionError as e:
                raise InvalidKnowledge(f"{sel_at}: {e}") from None
        k.rules[rule.code] = CompiledRule(rule, data["playbook"], str(path), line_of(lines, ("rules", i)), cond, sel)
        rules.append(rule)
    pb = Playbook(**header, rules=rules)
    if pb.playbook in k.playbooks:
        raise InvalidKnowledge(f"{path}:1: playbook {pb.playbook!r} already defined in "
                               f"{k.sources['playbook:' + pb.playbook]}")
    k.playbooks[pb.playbook] = pb
    k.sources["playbook:" + pb.playbook] = str(path)
    k.sources["origin:" + pb.playbook] = origin


def load_knowledge(extra_playbooks: Iterable[str | Path] = (), *, root: Path | None = None,
                   builtin_playbooks: bool = True) -> Knowledge:
    """Load the built-in knowledge plus any team playbook folders or files."""
    root = root or knowledge_root()
    k = Knowledge()
    for path in _files(root / "techniques"):
        _load_technique(k, path)
    for path in _files(root / "targets"):
        _load_target(k, path)
    if builtin_playbooks:
        for path in _files(root / "playbooks"):
            _load_playbook(k, path, "built-in")
    for extra in extra_playbooks:
        extra = Path(extra)
        if not extra.exists():
            raise InvalidKnowledge(f"{extra}: no such playbook file or folder")
        files = _files(extra) if extra.is_dir() else [extra]
        if extra.is_dir() and not files:
            raise InvalidKnowledge(f"{extra}: folder holds no .yaml playbooks")
        for path in files:
            _load_playbook(k, path, "user")
    return k


@lru_cache(maxsize=1)
def builtin() -> Knowledge:
    return load_knowledge()
