#!/usr/bin/env python3
"""Parses every PromQL expression in Prometheus rule files and Grafana
dashboards and prints the metric names they reference, as JSON:

    .tools/bin/python3 scripts/promql_names.py FILE...
    e.g. deploy/prometheus/keyward-alerts.yaml deploy/grafana/keyward-dashboard.json
    {"expressions": 77, "metrics": ["keyward_admin_refused_total", ...]}

Needs the .tools virtualenv's Python with promql-parser and PyYAML
(scripts/lib.sh: ensure_metrics_tools). promql-parser is the Python binding
of GreptimeTeam's Rust PromQL parser (Prometheus 2.45 grammar): it checks
syntax, function argument types (rate() of an instant vector fails) and
regular expressions in matchers.

Files, by extension:

  .yaml/.yml  Prometheus rule files: groups[].rules[].expr (alerting and
              recording rules); a PrometheusRule object (spec.groups) and
              several YAML documents in one file work too.
  .json       Grafana dashboards: every panel's targets[].expr (panels nested
              in rows included), annotations' expr, and the template
              variables' queries (see below).

Grafana variables are substituted before parsing, as Grafana itself would:
$__rate_interval, $__interval, $__range (also ${...} and [[...]] forms) by a
5m duration, $__interval_ms, $__range_s, $__range_ms by a number, and the
dashboard's own variables by a word inside quoted strings ($instance ->
"instance"), a 5m duration inside [...], and a number elsewhere. A variable
the dashboard does not declare is left alone, so it fails to parse (outside a
string). Rule files get no substitution: a rule's expr is plain PromQL.

Variable queries are Grafana's own syntax, not PromQL:
label_values(SELECTOR, label) and label_names(SELECTOR) parse SELECTOR,
query_result(EXPR) parses EXPR; label_values(label), label_names() and
metrics(regex) name no metric and are not counted.

"expressions" counts the expressions parsed. "metrics" lists the sorted
unique names of every vector selector, as written (a histogram's
keyward_check_duration_seconds_bucket stays so; {__name__="x"} gives x).
A selector without a fixed name ({__name__=~"..."}) is reported on stderr.

Exits 1 naming the file, where in it, and the expression when one does not
parse (all failures are listed), or when a file cannot be read; 2 on bad
arguments.
"""

import json
import pathlib
import re
import sys

try:
    import promql_parser
    import yaml
except ImportError as err:  # pragma: no cover - depends on the environment
    sys.exit(
        "promql_names.py: %s; run it with .tools/bin/python3 after "
        "ensure_metrics_tools (scripts/lib.sh)" % err
    )

# Grafana's built-in variables that stand for a duration / for a number.
DURATION_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_interval"}
NUMBER_BUILTINS = {"__interval_ms", "__range_s", "__range_ms", "__from", "__to", "__rate_interval_ms"}
# Grafana's variable syntaxes: $name, ${name}, ${name:format}, ${name.field},
# [[name]], [[name:format]].
VARIABLE = re.compile(
    r"\$(?P<plain>[A-Za-z_]\w*)"
    r"|\$\{(?P<braced>[A-Za-z_]\w*)(?:\.[^:}]+)?(?::[^}]+)?\}"
    r"|\[\[(?P<old>[A-Za-z_]\w*)(?::\w+)?\]\]"
)


class ExprError(Exception):
    pass


def substitute(expr, variables):
    """Replaces Grafana variables with parseable stand-ins (see the docstring)."""
    out = []
    quote = None  # the quote character of the string we are in, if any
    bracket = 0  # depth of [...] (ranges and subqueries) outside strings
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\" and quote != "`":
                out.append(expr[i : i + 2])
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c == "[" and not expr.startswith("[[", i):
            bracket += 1
        elif c == "]" and bracket:
            bracket -= 1
        m = VARIABLE.match(expr, i) if c in "$[" else None
        if m:
            name = m.group("plain") or m.group("braced") or m.group("old")
            if name in DURATION_BUILTINS:
                out.append(name if quote else "5m")
            elif name in NUMBER_BUILTINS:
                out.append(name if quote else "300")
            elif name in variables:
                out.append(name if quote else ("5m" if bracket else "1"))
            else:
                out.append(m.group(0))
            i = m.end()
            continue
        out.append(c)
        i += 1
    return "".join(out)


def split_args(text):
    """Splits a function's argument text on top-level commas."""
    args, depth, quote, cur = [], 0, None, []
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                cur.append(text[i : i + 2])
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    args.append("".join(cur).strip())
    return [a for a in args if a]


GRAFANA_QUERY = re.compile(r"^\s*(label_values|label_names|metrics|query_result)\s*\((.*)\)\s*$", re.S)


def variable_query_exprs(query):
    """PromQL inside a Grafana Prometheus variable query ([] when none)."""
    m = GRAFANA_QUERY.match(query)
    if not m:
        # Not one of Grafana's functions: a plain PromQL query (the
        # "classic query" variable type).
        return [query] if query.strip() else []
    func, args = m.group(1), split_args(m.group(2))
    if func == "label_values":
        return args[:1] if len(args) == 2 else []
    if func == "label_names":
        return args[:1]
    if func == "query_result":
        return [m.group(2).strip()]
    return []  # metrics(regex)


class Collector:
    def __init__(self):
        self.count = 0
        self.metrics = set()
        self.errors = []

    def add(self, path, where, expr, variables=()):
        if not isinstance(expr, str) or not expr.strip():
            return
        text = substitute(expr, set(variables)) if variables is not None else expr
        try:
            ast = promql_parser.parse(text)
        except Exception as err:
            shown = expr.strip() if text == expr else "%s  (after substitution: %s)" % (expr.strip(), text.strip())
            self.errors.append("%s: %s: %s\n    %s" % (path, where, err, shown))
            return
        self.count += 1

        def visit(node):
            if isinstance(node, promql_parser.VectorSelector):
                name = node.name
                if name is None:
                    for m in node.matchers.matchers:
                        if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal:
                            name = m.value
                if name is None:
                    print("promql_names.py: %s: %s: selector %s has no fixed metric name" % (path, where, node), file=sys.stderr)
                else:
                    self.metrics.add(name)

        promql_parser.walk(ast, visit)


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a key twice (PyYAML keeps the
    last silently; Prometheus refuses the file)."""


def _strict_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r" % (key,), key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def rule_groups(doc):
    if not isinstance(doc, dict):
        return []
    if isinstance(doc.get("spec"), dict) and "groups" in doc["spec"]:
        return doc["spec"]["groups"] or []
    return doc.get("groups") or []


def collect_rules(path, col):
    docs = list(yaml.load_all(path.read_text(), Loader=StrictLoader))
    for doc in docs:
        for g, group in enumerate(rule_groups(doc)):
            gname = group.get("name", "#%d" % g)
            for r, rule in enumerate(group.get("rules") or []):
                rname = rule.get("alert") or rule.get("record") or "#%d" % r
                if not str(rule.get("expr") or "").strip():
                    col.errors.append("%s: group %s rule %s: no expr" % (path, gname, rname))
                    continue
                col.add(path, "group %s rule %s" % (gname, rname), str(rule["expr"]), variables=None)


def dashboard_panels(panels):
    for panel in panels or []:
        yield panel
        # Collapsed rows hold their panels inside; library-less old-style
        # rows (dashboard "rows") are handled by the caller.
        yield from dashboard_panels(panel.get("panels"))


def collect_dashboard(path, col):
    dash = json.loads(path.read_text())
    if "dashboard" in dash and "panels" not in dash:  # an API export wrapper
        dash = dash["dashboard"]
    templating = (dash.get("templating") or {}).get("list") or []
    variables = {v["name"] for v in templating if isinstance(v, dict) and v.get("name")}

    for v in templating:
        if v.get("type") != "query":
            continue
        query = v.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        for expr in variable_query_exprs(query or ""):
            col.add(path, "variable %s" % v.get("name"), expr, variables)

    for a in (dash.get("annotations") or {}).get("list") or []:
        if a.get("expr"):
            col.add(path, "annotation %s" % a.get("name"), a["expr"], variables)

    panels = list(dashboard_panels(dash.get("panels")))
    for row in dash.get("rows") or []:  # pre-5.0 dashboards
        panels.extend(dashboard_panels(row.get("panels")))
    for panel in panels:
        for t in panel.get("targets") or []:
            if "expr" in t:
                where = "panel %r target %s" % (panel.get("title", panel.get("id")), t.get("refId", "?"))
                col.add(path, where, t["expr"], variables)


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    col = Collector()
    for name in argv:
        path = pathlib.Path(name)
        try:
            if path.suffix in (".yaml", ".yml"):
                collect_rules(path, col)
            elif path.suffix == ".json":
                collect_dashboard(path, col)
            else:
                col.errors.append("%s: not a .yaml/.yml rule file or a .json dashboard" % path)
        except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as err:
            col.errors.append("%s: cannot read: %s: %s" % (path, type(err).__name__, err))
    if col.errors:
        print("promql_names.py: %d problem(s):" % len(col.errors), file=sys.stderr)
        for e in col.errors:
            print("  " + e, file=sys.stderr)
        return 1
    json.dump({"expressions": col.count, "metrics": sorted(col.metrics)}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
