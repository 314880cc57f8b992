#!/usr/bin/env python3
"""Parses a Prometheus scrape (keyward's /metrics) from stdin and prints its
samples as JSON, so tests can assert on what a real parser makes of it.

    curl -s http://127.0.0.1:9090/metrics | .tools/bin/python3 scripts/parse_metrics.py
    curl -s -H 'Accept: application/openmetrics-text; version=1.0.0' \
        http://127.0.0.1:9090/metrics |
        .tools/bin/python3 scripts/parse_metrics.py --format openmetrics

Needs the .tools virtualenv's Python with prometheus-client (scripts/lib.sh:
ensure_metrics_tools). The parsers are prometheus_client's own:

  --format text         prometheus_client.parser (text format 0.0.4)
  --format openmetrics  prometheus_client.openmetrics.parser (OpenMetrics 1.0;
                        requires the closing "# EOF", checks histogram buckets,
                        counter suffixes, name clashes...)

Output: a JSON list, one object per sample, in exposition order:

  {"family": "keyward_checks", "type": "counter",
   "name": "keyward_checks_total", "labels": {"door": "check", "reason": "OK"},
   "value": 3.0}

  family  the metric family as prometheus_client names it: a counter's family
          drops the "_total" suffix in both formats (keyward_checks), a
          histogram's is the base name (keyward_check_duration_seconds);
  type    counter, gauge, histogram, summary, info, stateset, gaugehistogram or
          unknown (an untyped metric);
  name    the sample's name as exposed (keyward_checks_total,
          keyward_check_duration_seconds_bucket, ..._sum, ..._count,
          or an OpenMetrics counter's ..._created);
  labels  label name -> value (a bucket's "le" as written, e.g. "+Inf");
  value   a JSON number; NaN, +Inf and -Inf (which JSON cannot hold) are the
          strings "NaN", "+Inf" and "-Inf".

Only when present: "timestamp" (seconds, a number) and, in OpenMetrics,
"exemplar" ({"labels", "value", and "timestamp" if any}).

Exits 1 with a message on stderr (and nothing on stdout) when the input does
not parse (in the text format with the first line that fails), or when one
sample (name and labels) appears twice, which both formats forbid and
prometheus_client's text parser lets through; exits 2 on bad arguments.
"""

import argparse
import json
import math
import sys

try:
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as openmetrics_families,
    )
    from prometheus_client.parser import text_string_to_metric_families as text_families
except ImportError as err:  # pragma: no cover - depends on the environment
    sys.exit(
        "parse_metrics.py: prometheus_client is not importable (%s); run it with "
        ".tools/bin/python3 after ensure_metrics_tools (scripts/lib.sh)" % err
    )

PARSERS = {"text": text_families, "openmetrics": openmetrics_families}


def number(value):
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return value


def timestamp_seconds(ts):
    # The text parser gives float seconds; the OpenMetrics parser a
    # prometheus_client.samples.Timestamp (sec, nsec).
    if hasattr(ts, "sec") and hasattr(ts, "nsec"):
        return ts.sec + ts.nsec / 1e9
    return float(ts)


def sample_json(family, sample):
    out = {
        "family": family.name,
        "type": family.type,
        "name": sample.name,
        "labels": dict(sample.labels),
        "value": number(sample.value),
    }
    if sample.timestamp is not None:
        out["timestamp"] = timestamp_seconds(sample.timestamp)
    if sample.exemplar is not None:
        ex = {"labels": dict(sample.exemplar.labels), "value": number(sample.exemplar.value)}
        if sample.exemplar.timestamp is not None:
            ex["timestamp"] = timestamp_seconds(sample.exemplar.timestamp)
        out["exemplar"] = ex
    return out


def parse(text, fmt):
    """Returns the samples as JSON-ready dicts; raises ValueError on bad input."""
    samples = []
    seen = {}
    for family in PARSERS[fmt](text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key in seen:
                labels = ",".join('%s="%s"' % kv for kv in key[1])
                raise ValueError("duplicate sample %s{%s}" % (sample.name, labels))
            seen[key] = True
            samples.append(sample_json(family, sample))
    return samples


def failing_line(text):
    """For the text format, whose parser reads line by line: the first line
    at which a prefix of the input stops parsing, as (number, line), or None."""
    lines = text.splitlines(keepends=True)

    def fails(n):
        try:
            parse("".join(lines[:n]), "text")
        except Exception:
            return True
        return False

    if not fails(len(lines)):
        return None
    lo, hi = 1, len(lines)  # the smallest failing prefix length is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo, lines[lo - 1].rstrip("\n")


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Parse a Prometheus/OpenMetrics exposition from stdin and print its samples as JSON."
    )
    ap.add_argument(
        "--format",
        choices=sorted(PARSERS),
        default="text",
        help="exposition format of stdin (default: text, i.e. text format 0.0.4)",
    )
    args = ap.parse_args(argv)
    raw = sys.stdin.buffer.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        print("parse_metrics.py: input is not UTF-8: %s" % err, file=sys.stderr)
        return 1
    try:
        samples = parse(text, args.format)
    except Exception as err:  # the parsers raise ValueError, and sometimes others
        where = failing_line(text) if args.format == "text" else None
        print(
            "parse_metrics.py: not a valid %s exposition: %s: %s%s"
            % (
                args.format,
                type(err).__name__,
                err,
                "\n  at line %d: %s" % where if where else "",
            ),
            file=sys.stderr,
        )
        return 1
    json.dump(samples, sys.stdout, indent=1, allow_nan=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
