"""Docs generator: the pages under docs/reference/ (rules, techniques, targets, facts, schemas, CLI)."""
from __future__ import annotations

import importlib
import json
import re
from typing import Any

from compressadvise.ui.docsgen_firing import firing_markdown

REF = "docs/reference"


def _h1(text: str) -> str:
    m = re.search(r"^# (.+)$", text, re.M)
    return m.group(1).strip() if m else ""


def rule_page(k, cr, firing: dict | None) -> str:
    from compressadvise.knowledge.textdocs import rule_markdown

    text = rule_markdown(k, cr, link_prefix="../")
    head, sep, tail = text.partition("\n## Sources\n")
    return head + "\n" + firing_markdown(cr.code, firing).rstrip("\n") + "\n" + sep + tail


def rules_index(k) -> str:
    from compressadvise.knowledge.textdocs import cell

    lines = ["# Rules", "",
             f"{len(k.rules)} expert rules in {len(k.playbooks)} built-in playbook(s). Each page holds the "
             "text `compressadvise explain CODE` prints, plus a generated example of the rule firing. "
             "Conditions use the [condition facts](../facts.md); see the "
             "[playbook schema](../schemas/playbook.md) to write your own.", ""]
    for name, pb in sorted(k.playbooks.items()):
        where = "/".join(k.sources["playbook:" + name].split("/")[-2:])
        lines += [f"## {pb.title} {{#{name}}}", "",
                  f"Playbook `{name}` (version {pb.version}, `{where}`). {pb.description.strip()}", "",
                  "| code | title | scope | action | priority |", "| --- | --- | --- | --- | --- |"]
        for r in sorted(pb.rules, key=lambda r: r.code):
            act = r.action.kind + (f" {r.action.technique}" if r.action.technique else "")
            lines.append(f"| [{r.code}]({r.code}.md) | {cell(r.title)} | {r.scope} | {act} | {r.priority} |")
        lines.append("")
    return "\n".join(lines)


def techniques_index(k) -> str:
    from compressadvise.knowledge.textdocs import cell

    lines = ["# Techniques", "", "What each compression technique does, its parameters, its size formula "
             "(used for the plan's estimates) and where it runs.", "",
             "| technique | slot | data needed | summary |", "| --- | --- | --- | --- |"]
    for t in sorted(k.techniques.values(), key=lambda t: t.name):
        guidance = " (guidance only)" if t.guidance_only else ""
        lines.append(f"| [{t.title}]({t.name}.md) | {t.slot}{guidance} | {t.data} | {cell(t.summary)} |")
    return "\n".join(lines) + "\n"


def targets_index(k) -> str:
    from compressadvise.knowledge.textdocs import cell

    lines = ["# Targets", "", "Device profiles: what each runtime can load and accelerate at each OS, "
             "with the figures the rules rely on and their sources.", "",
             "| target | kind | OS (default) | accelerated at the default OS |", "| --- | --- | --- | --- |"]
    for t in sorted(k.targets.values(), key=lambda t: t.name):
        os_txt = f"{t.os_family} {t.min_os}+ ({t.default_os})" if t.os_family else "-"
        lines.append(f"| [{cell(t.title)}]({t.name}.md) | {t.kind} | {os_txt} | "
                     f"{', '.join(f'`{m}`' for m in t.accelerates(t.default_os)) or '-'} |")
    return "\n".join(lines) + "\n"


def facts_page() -> str:
    from compressadvise.knowledge.facts import LAYER_SCOPE, MODEL_SCOPE, NAMESPACES
    from compressadvise.knowledge.base import SIZE_VARIABLES
    from compressadvise.knowledge.textdocs import cell

    lines = ["# Condition facts", "",
             "A rule's `when` (and a compress action's `layers.where`) is a "
             "[CEL](https://github.com/google/cel-spec) expression over these facts. Conditions are "
             "type-checked against this table when a playbook loads, so a misspelt fact or a type "
             "mismatch is a `file:line` error, not a rule that silently never fires.", "",
             f"- `scope: model` rules see: {', '.join(f'`{n}`' for n in MODEL_SCOPE)}",
             f"- `scope: layer` rules see: {', '.join(f'`{n}`' for n in LAYER_SCOPE)} (evaluated once per "
             "layer of each planned step)", ""]
    for ns, facts in NAMESPACES.items():
        lines += [f"## {ns}", "", "| fact | type | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{ns}.{name}` | {f.type} | {cell(f.description)} |" for name, f in facts.items()]
        lines.append("")
    lines += ["## Size formula variables", "", "A technique's `size.formula` is CEL arithmetic over these "
              "variables, giving the bytes of one weight tensor (an estimate).", "",
              "| variable | meaning |", "| --- | --- |"]
    lines += [f"| `{v}` | {cell(d)} |" for v, d in SIZE_VARIABLES.items()]
    return "\n".join(lines) + "\n"


# ---- schemas
def _type_text(s: dict, prefix: str = "") -> str:
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{prefix}{name.lower()})"
    if "anyOf" in s:
        return " or ".join(_type_text(x, prefix) for x in s["anyOf"])
    if "enum" in s:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in s["enum"])
    if "const" in s:
        return f"`{json.dumps(s['const'])}`"
    t = s.get("type")
    if t == "array":
        return "list of " + _type_text(s.get("items", {}), prefix)
    if t == "object":
        extra = s.get("additionalProperties")
        return "map of string to " + _type_text(extra, prefix) if isinstance(extra, dict) and extra else "mapping"
    return t or "any"


def _field_notes(s: dict) -> str:
    notes = []
    for key, label in (("pattern", "pattern `{}`"), ("minimum", ">= {}"), ("maximum", "<= {}"),
                       ("minItems", "at least {} item(s)"), ("minLength", "at least {} character(s)")):
        if key in s:
            notes.append(label.format(s[key]))
    return "; ".join(notes)


def _object_table(schema: dict, prefix: str) -> list[str]:
    from compressadvise.knowledge.textdocs import cell

    props = schema.get("properties", {})
    if not props:
        return ["(no fields)", ""]
    required = set(schema.get("required", []))
    lines = ["| field | type | required | default | description |", "| --- | --- | --- | --- | --- |"]
    for name, s in props.items():
        default = f"`{json.dumps(s['default'])}`" if "default" in s else ""
        desc = " ".join(x for x in (s.get("description", ""), _field_notes(s)) if x)
        lines.append(f"| `{name}` | {_type_text(s, prefix)} | {'yes' if name in required else ''} | "
                     f"{cell(default)} | {cell(desc)} |")
    return lines + [""]


def _def_order(schema: dict, defs: dict) -> list[str]:
    """Definitions in order of first mention (breadth first), so the page reads top down."""
    order: list[str] = []
    queue = [schema]
    while queue:
        refs = re.findall(r'"\$ref": "#/\$defs/([^"]+)"', json.dumps(queue.pop(0)))
        for name in refs:
            if name not in order and name in defs:
                order.append(name)
                queue.append(defs[name])
    return order + sorted(set(defs) - set(order))


def schema_page(title: str, intro: str, model: type, mode: str, json_name: str) -> tuple[str, str]:
    """(markdown, JSON Schema text) for a pydantic model."""
    schema = model.model_json_schema(mode=mode)
    defs = dict(schema.get("$defs", {}))
    top = {k: v for k, v in schema.items() if k != "$defs"}
    lines = [f"# {title}", "", intro.strip(), "",
             f"Generated from `{model.__module__}.{model.__name__}`; machine-readable: "
             f"[`{json_name}`]({json_name}) (JSON Schema). Unknown keys are errors where the model "
             "forbids extra fields, so a typo is reported instead of silently ignored.", "",
             f"## {model.__name__} {{#def-{model.__name__.lower()}}}", ""]
    lines += _object_table(top, "def-")
    for name in _def_order(top, defs):
        d = defs[name]
        lines += [f"## {name} {{#def-{name.lower()}}}", ""]
        if d.get("description") and d.get("type") == "object":
            lines += [" ".join(d["description"].split()), ""]
        if d.get("type") == "object":
            lines += _object_table(d, "def-")
        else:
            lines += [_type_text(d, "def-"), ""]
    return "\n".join(lines), json.dumps(schema, indent=2) + "\n"


def _root_models(module: str) -> list[type]:
    """The result models a module defines: those that no other model of the module nests,
    preferring ones named *Result, *Manifest or *Report."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(module):
            return []
        raise
    from pydantic import BaseModel

    models = [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, BaseModel)
              and v.__module__ == mod.__name__]
    nested = {d for m in models for d in m.model_json_schema(mode="serialization").get("$defs", {})}
    roots = [m for m in models if m.__name__ not in nested]
    named = [m for m in roots if m.__name__.endswith(("Result", "Manifest", "Report"))]
    return sorted(named or roots, key=lambda m: m.__name__)


SCHEMA_INTROS = {
    "playbook": ("Playbook file", "A playbook is a YAML file of rules: `compressadvise recommend --playbooks "
                 "PATH` adds yours to the built-in ones and `compressadvise playbooks validate PATH` checks it "
                 "with `file:line` errors. Conditions use the [condition facts](../facts.md); the "
                 "[writing playbooks](../../guides/writing-playbooks.md) guide walks through one."),
    "technique": ("Technique file", "A technique (in `techniques/`) declares parameters, a size formula for "
                  "the plan's estimates, the runtime modes it needs and its backends."),
    "target": ("Target profile file", "A target profile (in `targets/`) lists what a device's runtime can "
               "load and accelerate at each OS, with sourced figures."),
    "plan": ("Plan file", "`compressadvise recommend --out plan.yaml` writes a plan; `compressadvise apply "
             "--plan plan.yaml` replays it, and a hand-written plan follows the same schema. It is also "
             "what `recommend --json` prints. Sizes under `prediction` and `predicted_bytes_after` are "
             "estimates."),
    "analysis": ("Analysis report", "What `compressadvise analyze --json` prints: the per-layer inventory, "
                 "weight statistics and model facts the rules see."),
}


def schema_pages(k) -> dict[str, str]:
    from compressadvise.model.analysis import ModelReport
    from compressadvise.knowledge.schema import Plan, Playbook, Target, Technique

    models: dict[str, tuple[type, str]] = {"playbook": (Playbook, "validation"), "technique": (Technique, "validation"),
                                           "target": (Target, "validation"), "plan": (Plan, "validation"),
                                           "analysis": (ModelReport, "serialization")}
    intros = dict(SCHEMA_INTROS)
    for stage, what in (("backends.apply", "`compressadvise apply` (its manifest and `--json` output)"),
                        ("measure.verify", "`compressadvise verify` (its result and `--json` output)")):
        module = stage.rsplit(".", 1)[1]
        for m in _root_models(f"compressadvise.{stage}"):
            key = f"{module}-{m.__name__.lower()}"
            models[key] = (m, "serialization")
            intros[key] = (f"{m.__name__} ({module})", f"Written or printed by {what}.")
    pages: dict[str, str] = {}
    for key, (model, mode) in models.items():
        title, intro = intros[key]
        md, js = schema_page(title, intro, model, mode, f"{key}.schema.json")
        pages[f"{REF}/schemas/{key}.md"] = md
        pages[f"{REF}/schemas/{key}.schema.json"] = js
    first_rule = min(k.rules, default=None)
    names = {key: model.__name__ for key, (model, _) in models.items()}
    pages[f"{REF}/schemas/json-output.md"] = json_output_page(first_rule, names)
    return pages


def json_output_page(first_rule: str | None, schema_names: dict[str, str]) -> str:
    """`--json` of every command that has it: what it prints, its schema, and a real, shortened
    output (via run markers) where running it on the bundled example is cheap."""
    known = {
        "analyze": ("a report", "[analysis report](analysis.md)", "compressadvise analyze --json"),
        "recommend": ("a plan", "[plan](plan.md)", "compressadvise recommend --json"),
        "rules": ("a list of rule summaries", "example below", "compressadvise rules --json"),
        "explain": ("one rule: its [playbook fields](playbook.md#def-rule) plus `playbook`, `file`, `line` and "
                    "the `markdown` text", "[rule](playbook.md#def-rule)",
                    f"compressadvise explain {first_rule} --json" if first_rule else ""),
        "techniques": ("a list of techniques", "[technique](technique.md)", "compressadvise techniques --json"),
        "targets": ("a list of target profiles", "[target](target.md)", "compressadvise targets --json"),
        "playbooks validate": ("`ok`, the number of rules and the playbook names", "example below",
                               "compressadvise playbooks validate --json"),
        "apply": ("`out_dir`, `torch_artifact`, `mlpackage` and the `manifest` (also written to "
                  "`manifest.json`; see [getting started](../../getting-started.md#4-apply-the-plan))", "", ""),
    }
    rows = []
    for path, cmd, _ in cli_commands()[1:]:
        if not any("--json" in getattr(p, "opts", []) for p in cmd.params):
            continue
        name = path.split(" ", 1)[1]
        module_keys = [k for k in schema_names if k.startswith(name + "-")]
        what, schema, run = known.get(name, ("", "", ""))
        if module_keys:
            schema = ", ".join(f"[{schema_names[k]}]({k}.md)" for k in module_keys)
        what = what or "its result (" + (cmd.help or "").strip().split("\n")[0].rstrip(".").lower() + ")"
        rows.append((name, what, schema or "not published as a schema yet", run))
    lines = ["# `--json` output", "",
             "Every command takes `--json` and then prints one JSON document on stdout (progress and "
             "errors go to stderr, so the output pipes cleanly). Examples below are real output on the "
             "bundled example, shortened: long lists keep two items, long strings are cut.", "",
             "| command | prints | schema |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {what} | {schema} |" for name, what, schema, _ in rows]
    lines.append("")
    for name, _, _, run in rows:
        if run:
            lines += [f"## {name}", "", f"<!-- docsgen:run json {run} -->", "<!-- /docsgen -->", ""]
    return "\n".join(lines)


# ---- CLI
def _param_row(p: Any, ctx: Any) -> str:
    from compressadvise.knowledge.textdocs import cell

    if p.param_type_name == "argument":
        name = f"`{getattr(p, 'display_name_raw', None) or p.name.upper()}`"
        value = _display_type(p, ctx)
    else:
        name = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        value = "flag" if getattr(p, "is_flag", False) else _display_type(p, ctx)
    if getattr(p, "multiple", False) or getattr(p, "nargs", 1) == -1:
        value = re.sub(r"^list\[(.*)\]$", r"\1", value)
        if p.param_type_name == "option":
            value += " (repeatable)"
        else:
            value += " (one or more)" if p.required else " (zero or more)"
    default = p.default
    empty = default is None or default is False or (isinstance(default, (str, tuple, list)) and not default)
    shown = "" if empty else f"`{default}`"
    req = "yes" if p.required else ""
    return f"| {name} | {cell(value)} | {req} | {cell(shown)} | {cell(p.help or '')} |"


def _display_type(p: Any, ctx: Any) -> str:
    try:
        return p.display_type(ctx).strip("<>")
    except (AttributeError, TypeError):
        return getattr(getattr(p, "type", None), "name", "") or "value"


def _command_md(cmd: Any, ctx: Any, path: str) -> list[str]:
    anchor = path.replace(" ", "-")
    lines = [f"## `{path}` {{#{anchor}}}", ""]
    if cmd.help:
        lines += [cmd.help.strip(), ""]
    usage = " ".join([path, *cmd.collect_usage_pieces(ctx)])
    lines += ["```text", usage, "```", ""]
    params = [p for p in cmd.params if not getattr(p, "hidden", False)]
    if params:
        lines += ["| argument / option | value | required | default | description |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [_param_row(p, ctx) for p in params]
        lines += ["| `--help` |  |  |  | Show the help and exit. |", ""]
    if getattr(cmd, "epilog", None):
        head, _, body = cmd.epilog.partition("\n\n")
        lines += [f"{head}", "", "```text", *(ln.strip() for ln in body.splitlines()), "```", ""]
    return lines


def cli_commands() -> list[tuple[str, Any, Any]]:
    """(path, click command, context) for every command of the Typer app, groups included."""
    import typer

    from compressadvise.ui.cli import app

    root = typer.main.get_command(app)
    out = []

    def walk(cmd: Any, parent: Any, name: str, path: str) -> None:
        ctx = cmd.context_class(cmd, info_name=name, parent=parent)
        out.append((path, cmd, ctx))
        for sub_name, sub in getattr(cmd, "commands", {}).items():  # registration order: the workflow
            walk(sub, ctx, sub_name, f"{path} {sub_name}")

    walk(root, None, "compressadvise", "compressadvise")
    return out


def cli_page() -> str:
    cmds = cli_commands()
    lines = ["# CLI reference", "",
             "Generated from the Typer app (`compressadvise.ui.cli.app`): the same text as `--help`. "
             "Every command takes `--json`; errors print one line on stderr and exit with a "
             "documented [exit code](exit-codes.md).", "",
             "| command | what it does |", "| --- | --- |"]
    for path, cmd, _ in cmds[1:]:
        summary = (cmd.help or "").strip().split("\n")[0]
        lines.append(f"| [`{path}`](#{path.replace(' ', '-')}) | {summary} |")
    lines.append("")
    for path, cmd, ctx in cmds:
        lines += _command_md(cmd, ctx, path)
    return "\n".join(lines)


def exit_codes_page() -> str:
    from compressadvise.ui.cli import exit_codes_markdown

    return ("# Exit codes\n\nEvery error is one line on stderr and one of these exit codes, so a CI "
            "step can tell a missed budget (1) from a broken setup. The table is generated from "
            "`compressadvise.errors.EXIT_CODES`.\n\n" + exit_codes_markdown())


def reference_index(k) -> str:
    return "\n".join([
        "# Reference", "",
        "Everything in this section is generated by `python -m compressadvise.ui.docsgen` from the "
        "knowledge base, the schemas and the CLI, and CI fails when it is stale.", "",
        "- [CLI reference](cli.md) and [exit codes](exit-codes.md)",
        f"- [Rules](rules/index.md): {len(k.rules)} expert rules, one page each",
        f"- [Techniques](techniques/index.md): {len(k.techniques)}, with parameters, size formula and "
        "support by target and OS",
        f"- [Targets](targets/index.md): {len(k.targets)} device profiles with sourced figures",
        "- [Condition facts](facts.md): what a rule's condition can ask",
        "- Schemas: [playbook](schemas/playbook.md), [plan](schemas/plan.md), "
        "[technique](schemas/technique.md), [target](schemas/target.md), "
        "[analysis report](schemas/analysis.md), [`--json` output](schemas/json-output.md)", ""])


def reference_pages(k, firing: dict | None = None) -> dict[str, str]:
    """Every page under docs/reference/, from the knowledge base (no command is run here)."""
    from compressadvise.knowledge.textdocs import target_markdown, technique_markdown

    pages = {f"{REF}/index.md": reference_index(k), f"{REF}/cli.md": cli_page(),
             f"{REF}/exit-codes.md": exit_codes_page(), f"{REF}/facts.md": facts_page(),
             f"{REF}/rules/index.md": rules_index(k), f"{REF}/techniques/index.md": techniques_index(k),
             f"{REF}/targets/index.md": targets_index(k)}
    for code, cr in sorted(k.rules.items()):
        pages[f"{REF}/rules/{code}.md"] = rule_page(k, cr, firing)
    for name, t in sorted(k.techniques.items()):
        pages[f"{REF}/techniques/{name}.md"] = technique_markdown(k, t, link_prefix="../")
    for name, t in sorted(k.targets.items()):
        pages[f"{REF}/targets/{name}.md"] = target_markdown(k, t, link_prefix="../")
    pages.update(schema_pages(k))
    return pages
