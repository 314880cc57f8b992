#!/usr/bin/env python3
"""Tests on the Helm chart's rendered YAML (helm/keyward).

Run by scripts/check-deploy with the .tools virtualenv's Python (PyYAML) and
.tools/bin on PATH (helm, envoy, openssl from Debian). Each test_* function
renders the chart itself with `helm template` and asserts one property; the
last line is "N passed, N failed", and the exit status is non-zero when any
test failed.

    .tools/bin/python3 scripts/deploy_test.py [NAME_SUBSTRING ...]
    KEYWARD_CHART=/tmp/broken/keyward .tools/bin/python3 scripts/deploy_test.py
"""

import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
# KEYWARD_CHART: test another copy of the chart (e.g. a deliberately broken one).
CHART = pathlib.Path(os.environ.get("KEYWARD_CHART", ROOT / "helm" / "keyward")).resolve()
EXAMPLES = sorted((CHART / "ci").glob("*.yaml"))
ENVOY_EXAMPLE = ROOT / "deploy" / "envoy" / "envoy.yaml"
# keyward's settings: every `env = "..."` of src/config.rs.
CONFIG_RS = ROOT / "src" / "config.rs"
RELEASE = "keyward"
NAMESPACE = "keyward"
HELM = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
ENVOY = shutil.which("envoy") or str(ROOT / ".tools" / "bin" / "envoy")

# Every values file the chart is checked with: the defaults and each example.
VALUE_SETS = [None] + EXAMPLES

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


class Failure(AssertionError):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


def name_of(values_file):
    return "default values" if values_file is None else values_file.relative_to(CHART.parent).as_posix()


def helm_args(values_files=(), sets=()):
    args = []
    for f in values_files:
        if f is not None:
            args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    return args


def run_helm(*args):
    return subprocess.run([HELM, *args], capture_output=True, text=True, cwd=ROOT)


@functools.lru_cache(maxsize=None)
def _render(values_files, sets):
    proc = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    *helm_args(values_files, sets))
    if proc.returncode != 0:
        raise Failure(f"helm template {' '.join(helm_args(values_files, sets))} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render(*values_files, sets=()):
    """The chart's objects for these values files (None: defaults) and --set values."""
    return _render(tuple(values_files), tuple(sets))


def objects(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def one(docs, kind, name=None):
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    check(len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def server_deployment(docs):
    return one(docs, "Deployment", RELEASE)


def pod_spec(workload):
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    if workload["kind"] == "Pod":
        return spec
    return spec["template"]["spec"]


def containers(spec):
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def container(workload, name):
    found = [c for c in containers(pod_spec(workload)) if c["name"] == name]
    check(len(found) == 1, f"{workload['kind']} {workload['metadata']['name']} has no container {name!r}")
    return found[0]


def env_of(c):
    return {e["name"]: e for e in c.get("env") or []}


def expect_rejected(extra_yaml=None, sets=(), why=""):
    """helm lint --strict and helm template must both refuse these values
    because of values.schema.json."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        if extra_yaml is not None:
            f.write(extra_yaml)
        path = f.name
    try:
        args = ["-f", path] + [a for s in sets for a in ("--set", s)]
        for cmd in (["lint", "--strict", str(CHART)],
                    ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]):
            proc = run_helm(*cmd, *args)
            out = proc.stdout + proc.stderr
            check(proc.returncode != 0,
                  f"helm {cmd[0]} accepted {why}: {extra_yaml or ''}{' '.join(sets)}")
            check("schema" in out,
                  f"helm {cmd[0]} refused {why}, but not through values.schema.json:\n{out}")
    finally:
        os.unlink(path)


# --- probes ----------------------------------------------------------------------


def test_probes_use_grpc_port_and_health_service():
    docs = render(None)
    c = container(server_deployment(docs), "keyward")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(ports.get("grpc") == 50051, f"container port grpc is {ports.get('grpc')}, want 50051")
    want = {"startupProbe": "liveness", "livenessProbe": "liveness", "readinessProbe": ""}
    for probe, service in want.items():
        p = c.get(probe)
        check(p is not None, f"no {probe}")
        check(set(p) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"},
              f"{probe} is not a native gRPC probe: {p}")
        check(p["grpc"].get("port") == ports["grpc"],
              f"{probe} asks port {p['grpc'].get('port')}, not the gRPC port {ports['grpc']}")
        check(p["grpc"].get("service", "") == service,
              f"{probe} asks health service {p['grpc'].get('service', '')!r}, want {service!r}")
    # The Service's grpc port leads to the same container port.
    svc = one(docs, "Service", RELEASE)
    grpc = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    check(grpc and grpc[0]["targetPort"] in ("grpc", ports["grpc"]), "Service port grpc does not target the gRPC port")


def test_probes_follow_a_moved_grpc_port():
    c = container(server_deployment(render(None, sets=("grpc.port=6000",))), "keyward")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        check(c[probe]["grpc"]["port"] == 6000, f"{probe} still asks {c[probe]['grpc']['port']}")
    check(env_of(c)["KEYWARD_GRPC_ADDR"]["value"] == "0.0.0.0:6000", "KEYWARD_GRPC_ADDR does not follow grpc.port")


def test_tls_switches_probes_to_http_on_the_metrics_port():
    c = container(server_deployment(render(CHART / "ci" / "tls-values.yaml")), "keyward")
    want = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe, path in want.items():
        p = c[probe]
        check("grpc" not in p, f"{probe} is a gRPC probe although the gRPC port speaks TLS")
        check(p.get("httpGet", {}).get("path") == path, f"{probe} is {p}, want httpGet {path}")
        check(p["httpGet"].get("port") in ("metrics", 9090), f"{probe} is not on the metrics port")
        check(p["httpGet"].get("scheme", "HTTP") == "HTTP", f"{probe} is not plain HTTP")


# --- secrets ---------------------------------------------------------------------

SECRET_ENV = ("DATABASE_URL", "KEYWARD_LISTEN_DATABASE_URL", "KEYWARD_REDIS_URL")


def test_database_url_comes_only_from_a_secret():
    for values in VALUE_SETS:
        docs = render(values)
        secrets = {d["metadata"]["name"] for d in objects(docs, "Secret")}
        seen = 0
        for w in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
            for c in containers(pod_spec(w)):
                where = f"{name_of(values)}: {w['kind']} {w['metadata']['name']}, container {c['name']}"
                check(not c.get("envFrom"), f"{where} uses envFrom, which could carry DATABASE_URL as plain text")
                for e in c.get("env") or []:
                    if e["name"] not in SECRET_ENV:
                        check("postgres://" not in str(e.get("value", "")) and "redis://" not in str(e.get("value", "")),
                              f"{where}: {e['name']} holds a connection string as plain text")
                        continue
                    check("value" not in e, f"{where}: {e['name']} is a literal value")
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    check(ref and ref.get("name") and ref.get("key"), f"{where}: {e['name']} is not from a secretKeyRef")
                    if e["name"] == "DATABASE_URL":
                        seen += 1
                    chart_made = ref["name"] in secrets
                    check(chart_made or ref["name"] == yaml.safe_load((values or CHART / "values.yaml").read_text()).get("existingSecret"),
                          f"{where}: {e['name']} reads Secret {ref['name']}, neither the chart's nor existingSecret")
        check(seen >= 1, f"{name_of(values)}: no container reads DATABASE_URL")
        for cm in objects(docs, "ConfigMap"):
            check("postgres://" not in yaml.safe_dump(cm.get("data", {})),
                  f"{name_of(values)}: ConfigMap {cm['metadata']['name']} holds a PostgreSQL URL")


def test_existing_secret_means_no_chart_made_secret():
    docs = render(CHART / "ci" / "migration-job-values.yaml")
    check(not objects(docs, "Secret"), "the chart made a Secret although existingSecret is set")
    for w in (server_deployment(docs), one(docs, "Job")):
        ref = env_of(containers(pod_spec(w))[0])["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        check(ref["name"] == "keyward-db", f"{w['kind']} reads DATABASE_URL from {ref['name']}, not existingSecret")
    job_ref = env_of(container(one(docs, "Job"), "migrate"))["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    check(job_ref["key"] == "MIGRATE_URL", "the Job does not use existingSecretKeys.migrationDatabaseUrl")


def test_schema_refuses_connection_strings_as_plain_env():
    expect_rejected("config:\n  extraEnv:\n    DATABASE_URL: postgres://x@y/z\n", why="DATABASE_URL in config.extraEnv")


# --- security context -------------------------------------------------------------


def test_no_container_runs_as_root():
    seen = set()
    for values in VALUE_SETS:
        for w in (d for d in render(values) if d["kind"] in WORKLOAD_KINDS):
            spec = pod_spec(w)
            pod = spec.get("securityContext") or {}
            for c in containers(spec):
                where = f"{name_of(values)}: {w['kind']} {w['metadata']['name']}, container {c['name']}"
                sc = c.get("securityContext") or {}
                non_root = sc.get("runAsNonRoot", pod.get("runAsNonRoot"))
                uid = sc.get("runAsUser", pod.get("runAsUser"))
                check(non_root is True, f"{where}: runAsNonRoot is {non_root!r}")
                check(isinstance(uid, int) and uid != 0, f"{where}: runAsUser is {uid!r}")
                check(sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem is writable")
                check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false")
                check(sc.get("privileged") is not True, f"{where}: privileged")
                check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{where}: capabilities not dropped")
                check(not (sc.get("capabilities") or {}).get("add"), f"{where}: capabilities added")
                seccomp = (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
                check(seccomp == "RuntimeDefault", f"{where}: seccomp profile is {seccomp!r}")
                seen.add((w["kind"], c["name"]))
    # Not vacuous: the server, the migration Job and the example Envoy were all looked at.
    for want in (("Deployment", "keyward"), ("Job", "migrate"), ("Deployment", "envoy")):
        check(want in seen, f"no {want[0]} container {want[1]!r} in any values file")


def test_schema_refuses_root():
    expect_rejected("securityContext:\n  runAsUser: 0\n", why="runAsUser 0")


# --- replicas and the HPA -----------------------------------------------------------


def test_hpa_and_replicas_never_both():
    with_hpa = without_hpa = 0
    for values in VALUE_SETS:
        docs = render(values)
        dep = server_deployment(docs)
        hpas = objects(docs, "HorizontalPodAutoscaler")
        if hpas:
            with_hpa += 1
            check(len(hpas) == 1, f"{name_of(values)}: {len(hpas)} HPAs")
            hpa = hpas[0]
            check(hpa["apiVersion"] == "autoscaling/v2", f"{name_of(values)}: HPA is {hpa['apiVersion']}")
            target = hpa["spec"]["scaleTargetRef"]
            check(target["kind"] == "Deployment" and target["name"] == dep["metadata"]["name"],
                  f"{name_of(values)}: the HPA scales {target}, not the Deployment")
            check("replicas" not in dep["spec"], f"{name_of(values)}: the HPA is on and the Deployment sets replicas")
        else:
            without_hpa += 1
            check(isinstance(dep["spec"].get("replicas"), int),
                  f"{name_of(values)}: no HPA and the Deployment sets no replicas")
    check(with_hpa and without_hpa, "the values files do not cover both autoscaling on and off")


# --- values.schema.json ---------------------------------------------------------------


def test_schema_rejects_wrong_types():
    expect_rejected('replicaCount: "three"\n', why='replicaCount: "three"')
    expect_rejected(sets=("tls.enabled=maybe",), why="tls.enabled=maybe")
    expect_rejected("shutdown:\n  delaySeconds: 5s\n", why="shutdown.delaySeconds: 5s")
    expect_rejected("config:\n  runtime: threaded\n", why="config.runtime: threaded")
    expect_rejected("resources:\n  limits:\n    cpu: lots\n", why="resources.limits.cpu: lots")


def test_schema_rejects_unknown_keys():
    expect_rejected("replicas: 3\n", why="an unknown top-level key")
    expect_rejected("image:\n  tagg: v1\n", why="an unknown key under image")
    expect_rejected("autoscaling:\n  enabled: true\n  maxReplica: 3\n", why="an unknown key under autoscaling")
    expect_rejected("envoy:\n  routes:\n    - prefix: /x\n      scope: a\n", why="an unknown key in an Envoy route")


def test_schema_accepts_what_it_should():
    # The control for the two tests above: the same keys with right values pass.
    for extra in ('replicaCount: 3\n', "tls:\n  enabled: false\n", "shutdown:\n  delaySeconds: 7\n"):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(extra)
            f.flush()
            proc = run_helm("lint", "--strict", str(CHART), "-f", f.name)
            check(proc.returncode == 0, f"helm lint refused the valid {extra!r}:\n{proc.stdout}{proc.stderr}")


# --- shutdown --------------------------------------------------------------------------


def test_termination_grace_covers_shutdown_delay_and_grace():
    for sets, delay, grace in (((), 5, 20), (("shutdown.delaySeconds=10", "shutdown.graceSeconds=50"), 10, 50)):
        dep = server_deployment(render(None, sets=sets))
        env = env_of(container(dep, "keyward"))
        check(env["KEYWARD_SHUTDOWN_DELAY"]["value"] == f"{delay}s", f"KEYWARD_SHUTDOWN_DELAY is {env['KEYWARD_SHUTDOWN_DELAY']}")
        check(env["KEYWARD_SHUTDOWN_GRACE"]["value"] == f"{grace}s", f"KEYWARD_SHUTDOWN_GRACE is {env['KEYWARD_SHUTDOWN_GRACE']}")
        tgps = pod_spec(dep)["terminationGracePeriodSeconds"]
        # After the grace, keyward returns credit reservations and writes the
        # last usage, up to 5 s each (startup.rs, FINAL_FLUSH_TIMEOUT).
        check(tgps >= delay + grace + 10,
              f"terminationGracePeriodSeconds {tgps} < delay {delay} + grace {grace} + 10 s of final writes")


# --- Services ----------------------------------------------------------------------------


def test_services_select_only_the_server_pods():
    for values in VALUE_SETS:
        docs = render(values)
        labels = server_deployment(docs)["spec"]["template"]["metadata"]["labels"]
        other_pods = [w["spec"]["template"]["metadata"]["labels"] for w in docs
                      if w["kind"] in ("Deployment", "Job") and w["metadata"]["name"] != RELEASE]
        for name in (RELEASE, f"{RELEASE}-headless"):
            svc = one(docs, "Service", name)
            sel = svc["spec"]["selector"]
            check(all(labels.get(k) == v for k, v in sel.items()), f"{name_of(values)}: Service {name} misses the server pods")
            for other in other_pods:
                check(not all(other.get(k) == v for k, v in sel.items()),
                      f"{name_of(values)}: Service {name} also selects pods labelled {other}")


def test_grpc_service_and_headless_service():
    docs = render(None)
    for name, headless in ((RELEASE, False), (f"{RELEASE}-headless", True)):
        svc = one(docs, "Service", name)
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        check(ports["grpc"]["port"] == 50051 and ports["grpc"].get("appProtocol") == "grpc",
              f"Service {name}: grpc port is {ports['grpc']}")
        check(ports["metrics"]["port"] == 9090, f"Service {name}: metrics port is {ports['metrics']}")
        check((svc["spec"].get("clusterIP") == "None") == headless, f"Service {name}: clusterIP {svc['spec'].get('clusterIP')}")


def test_servicemonitor_scrapes_the_metrics_port_of_one_service():
    # kubernetes-validate has no schema for this CRD (check-deploy leaves
    # monitoring.coreos.com out of it), so its shape is checked here.
    docs = render(CHART / "ci" / "scaling-values.yaml")
    sm = one(docs, "ServiceMonitor")
    check(sm["apiVersion"] == "monitoring.coreos.com/v1", f"ServiceMonitor is {sm['apiVersion']}")
    check(sm["metadata"]["labels"].get("release") == "prometheus", "metrics.serviceMonitor.labels not applied")
    sel = sm["spec"]["selector"]
    matched = []
    for svc in objects(docs, "Service"):
        labels = svc["metadata"]["labels"]
        ok = all(labels.get(k) == v for k, v in sel.get("matchLabels", {}).items())
        for expr in sel.get("matchExpressions", []):
            check(expr["operator"] in ("In", "NotIn", "Exists", "DoesNotExist"), f"bad operator {expr}")
            present = expr["key"] in labels
            ok = ok and {"Exists": present, "DoesNotExist": not present,
                         "In": labels.get(expr["key"]) in expr.get("values", []),
                         "NotIn": labels.get(expr["key"]) not in expr.get("values", [])}[expr["operator"]]
        if ok:
            matched.append(svc)
    check(len(matched) == 1, f"the ServiceMonitor selects {[s['metadata']['name'] for s in matched]}: want exactly one Service")
    port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        check(ep["port"] in port_names and ep["port"] == "metrics", f"endpoint port {ep['port']} is not the metrics port")
        check(ep.get("path") == "/metrics", f"endpoint path {ep.get('path')}")
    check(sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE], "the ServiceMonitor looks in other namespaces")
    check(not objects(render(None), "ServiceMonitor"), "a ServiceMonitor without metrics.serviceMonitor.enabled")


# --- migrations --------------------------------------------------------------------------


def test_migrations_on_start_by_default_or_in_a_hook_job():
    docs = render(None)
    check(not objects(docs, "Job"), "a migration Job with the defaults")
    env = env_of(container(server_deployment(docs), "keyward"))
    check(env["KEYWARD_MIGRATE_ON_START"]["value"] == "true", "the defaults do not migrate on start")

    docs = render(CHART / "ci" / "migration-job-values.yaml")
    job = one(docs, "Job")
    ann = job["metadata"]["annotations"]
    check(set(ann["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}, f"hook is {ann['helm.sh/hook']}")
    check(container(job, "migrate")["args"] == ["migrate"], "the Job does not run `keyward migrate`")
    check(pod_spec(job)["restartPolicy"] == "Never", "the Job's pods restart in place")
    env = env_of(container(server_deployment(docs), "keyward"))
    check(env["KEYWARD_MIGRATE_ON_START"]["value"] == "false", "replicas still migrate on start with the Job on")
    check("serviceAccountName" not in pod_spec(job) or pod_spec(job)["serviceAccountName"] == "keyward",
          "the hook Job uses the chart's ServiceAccount, which does not exist before install")

    # The Job's Secret must exist before the Job: the chart insists on existingSecret.
    proc = run_helm("template", RELEASE, str(CHART), "--set", "migrations.job.enabled=true")
    check(proc.returncode != 0 and "existingSecret" in proc.stderr,
          f"a hook Job without existingSecret was accepted:\n{proc.stderr}")


def test_migration_job_connects_directly():
    # `keyward migrate` holds a session-level advisory lock: it must reach
    # PostgreSQL directly, never through a transaction-pooling PgBouncer. It
    # connects to KEYWARD_LISTEN_DATABASE_URL when set, else DATABASE_URL.
    docs = render(CHART / "ci" / "migration-job-values.yaml")
    env = env_of(container(one(docs, "Job"), "migrate"))
    check(env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "MIGRATE_URL",
          "the Job does not use existingSecretKeys.migrationDatabaseUrl")
    check("KEYWARD_LISTEN_DATABASE_URL" not in env,
          "the Job gets the replicas' LISTEN URL, which would win over its own migration URL")
    docs = render(CHART / "ci" / "migration-job-values.yaml", sets=("existingSecretKeys.migrationDatabaseUrl=",))
    env = env_of(container(one(docs, "Job"), "migrate"))
    check(env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "DATABASE_URL", "the Job's DATABASE_URL")
    listen = env.get("KEYWARD_LISTEN_DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
    check(listen.get("key") == "LISTEN_URL",
          "without a migration URL the Job does not get the direct KEYWARD_LISTEN_DATABASE_URL, "
          "so it would migrate through PgBouncer")


# --- TLS -----------------------------------------------------------------------------------


def test_tls_from_secrets_mounted_read_only_as_directories():
    dep = server_deployment(render(CHART / "ci" / "tls-values.yaml"))
    c = container(dep, "keyward")
    env = env_of(c)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    for var in ("KEYWARD_TLS_CERT", "KEYWARD_TLS_KEY", "KEYWARD_TLS_CLIENT_CA",
                "KEYWARD_ADMIN_TLS_CERT", "KEYWARD_ADMIN_TLS_KEY", "KEYWARD_ADMIN_TLS_CLIENT_CA"):
        path = env[var]["value"]
        mount = [m for m in mounts.values() if path.startswith(m["mountPath"] + "/")]
        check(len(mount) == 1, f"{var}={path} is on no volume mount")
        check(mount[0].get("readOnly") is True, f"{var}'s mount is writable")
        check("subPath" not in mount[0], f"{var}'s mount uses subPath, which never sees a renewed certificate")
        check("secret" in volumes[mount[0]["name"]], f"{var} is not from a Secret")
    check(volumes["tls"]["secret"]["secretName"] == "keyward-grpc-tls", "tls.secretName not used")
    check(env["KEYWARD_ADMIN_ADDR"]["value"] == "0.0.0.0:50052", "admin listener not configured")


# --- keyward's settings ---------------------------------------------------------------------

# Set by the pods themselves: the downward API (for OTEL_RESOURCE_ATTRIBUTES)
# and the standard OpenTelemetry variables keyward's exporter reads.
NOT_KEYWARD_SETTINGS = {"POD_NAME", "POD_NAMESPACE", "NODE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT",
                        "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
                        "OTEL_RESOURCE_ATTRIBUTES"}
# What `enableServiceLinks: false` keeps out, named in the chart's comments.
DOCKER_LINK_VARIABLES = {"KEYWARD_PORT", "KEYWARD_SERVICE_HOST"}


@functools.lru_cache(maxsize=None)
def keyward_settings():
    names = set(re.findall(r'\benv = "([A-Z0-9_]+)"', CONFIG_RS.read_text()))
    check(len(names) > 40 and "DATABASE_URL" in names, f"found only {sorted(names)} in {CONFIG_RS}")
    return names


def keyward_env_names(docs):
    """Env names of keyward's containers: the server's and the migration Job's."""
    names = set()
    for w in docs:
        if w["kind"] in WORKLOAD_KINDS:
            for c in containers(pod_spec(w)):
                if c["name"] in ("keyward", "migrate"):
                    names |= set(env_of(c))
    return names


# Values that turn on every optional setting the chart renders (and no extraEnv).
EVERYTHING = (CHART / "ci" / "tls-values.yaml",)
EVERYTHING_SETS = ("existingSecret=keyward-db", "existingSecretKeys.listenDatabaseUrl=LISTEN_URL",
                   "existingSecretKeys.redisUrl=REDIS_URL", "migrations.job.enabled=true",
                   "config.workerThreads=2", "otel.endpoint=http://collector:4317")


def test_every_env_name_the_chart_sets_is_a_keyward_setting():
    settings = keyward_settings()
    for values, sets in [((v,), ()) for v in VALUE_SETS] + [(EVERYTHING, EVERYTHING_SETS)]:
        for name in sorted(keyward_env_names(render(*values, sets=sets)) - NOT_KEYWARD_SETTINGS):
            check(name in settings,
                  f"{', '.join(name_of(v) for v in values)}: the chart sets {name}, which keyward does not read (src/config.rs)")


def test_every_keyward_name_in_the_chart_is_a_keyward_setting():
    # Comments, README and examples included: KEYWARD_CACHE_CAPACITY once
    # stood in values.yaml, and a copied typo is silently ignored by keyward.
    settings = keyward_settings() | DOCKER_LINK_VARIABLES
    for path in sorted(CHART.rglob("*")):
        if path.is_file():
            text = path.read_text()
            for name in sorted(set(re.findall(r"\bKEYWARD_[A-Z0-9][A-Z0-9_]*(?![A-Z0-9_*])", text))):
                check(name in settings, f"{path.relative_to(CHART.parent)} names {name}, which keyward does not read")
            # KEYWARD_ADMIN_TLS_*: a prefix of some setting.
            for prefix in sorted(set(re.findall(r"\b(KEYWARD_[A-Z0-9_]*)\*", text))):
                check(any(n.startswith(prefix) for n in settings),
                      f"{path.relative_to(CHART.parent)} names {prefix}*, which no setting of keyward's matches")


def test_extra_env_takes_only_settings_the_chart_does_not_set():
    schema = json.loads((CHART / "values.schema.json").read_text())
    names = schema["properties"]["config"]["properties"]["extraEnv"]["propertyNames"]
    refused = set(names["not"]["enum"])
    [allowed] = [a["enum"] for a in names["anyOf"] if "enum" in a]
    rendered = keyward_env_names(render(*EVERYTHING, sets=EVERYTHING_SETS))
    check(rendered <= refused, f"extraEnv may set names the chart sets itself: {sorted(rendered - refused)}")
    keyward = {n for n in keyward_settings() if n.startswith("KEYWARD_")}
    check(set(allowed) == keyward - refused,
          f"values.schema.json's extraEnv names are not src/config.rs's minus the chart's own: "
          f"missing {sorted(keyward - refused - set(allowed))}, extra {sorted(set(allowed) - (keyward - refused))}")
    expect_rejected("config:\n  extraEnv:\n    KEYWARD_CACHE_CAPACITY: \"1000\"\n", why="a KEYWARD_* name keyward does not read")
    expect_rejected("config:\n  extraEnv:\n    KEYWARD_GRPC_ADDR: 0.0.0.0:1\n", why="a setting the chart sets from grpc.port")
    expect_rejected("config:\n  cacheMaxBytes: lots\n", why="config.cacheMaxBytes: lots")
    docs = render(None, sets=("config.extraEnv.KEYWARD_CACHE_TTL=30s", "config.extraEnv.OTEL_EXPORTER_OTLP_COMPRESSION=gzip",
                              "config.cacheMaxBytes=1GiB"))
    env = env_of(container(server_deployment(docs), "keyward"))
    check(env["KEYWARD_CACHE_TTL"]["value"] == "30s" and env["OTEL_EXPORTER_OTLP_COMPRESSION"]["value"] == "gzip",
          "config.extraEnv not rendered")
    check(env.get("KEYWARD_CACHE_MAX_BYTES", {}).get("value") == "1GiB", "config.cacheMaxBytes is not KEYWARD_CACHE_MAX_BYTES")


# --- annotations ---------------------------------------------------------------------------


def test_config_and_secret_checksums_roll_the_pods():
    base = server_deployment(render(None))["spec"]["template"]["metadata"]["annotations"]
    for key in ("checksum/config", "checksum/secret"):
        check(len(base.get(key, "")) == 64, f"no {key} annotation")
    changed = server_deployment(render(None, sets=("config.rustLog=debug",)))["spec"]["template"]["metadata"]["annotations"]
    check(changed["checksum/config"] != base["checksum/config"], "checksum/config ignores a settings change")
    changed = server_deployment(render(None, sets=("database.url=postgres://other/keyward",)))["spec"]["template"]["metadata"]["annotations"]
    check(changed["checksum/secret"] != base["checksum/secret"], "checksum/secret ignores a database.url change")


# --- NOTES.txt -------------------------------------------------------------------------------


def notes(*values_files):
    proc = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                    *helm_args(values_files))
    check(proc.returncode == 0, f"helm install --dry-run=client failed:\n{proc.stderr}")
    check("NOTES:" in proc.stdout, "no NOTES")
    return proc.stdout.split("NOTES:", 1)[1]


def test_notes_tell_how_to_bootstrap_and_wire_envoy():
    for values in (None, CHART / "ci" / "tls-values.yaml"):
        text = notes(values)
        check(f"kubectl -n {NAMESPACE} exec deploy/{RELEASE}" in text and "keyward bootstrap --owner" in text,
              f"{name_of(values)}: NOTES do not show the bootstrap with kubectl exec")
        check(f"{RELEASE}-headless.{NAMESPACE}.svc.cluster.local, port_value: 50051" in text
              and "STRICT_DNS" in text, f"{name_of(values)}: NOTES do not point Envoy at the headless Service")


# --- the Envoy example ---------------------------------------------------------------------


def envoy_config(*values_files, sets=()):
    cm = one(render(*values_files, sets=sets), "ConfigMap", f"{RELEASE}-envoy")
    return yaml.safe_load(cm["data"]["envoy.yaml"])


def hcm(config, listener):
    [lst] = [l for l in config["static_resources"]["listeners"] if l["name"] == listener]
    [f] = [f for f in lst["filter_chains"][0]["filters"] if f["name"] == "envoy.filters.network.http_connection_manager"]
    return f["typed_config"]


def cluster(config, name):
    [c] = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return c


def test_envoy_example_embeds_deploy_envoy_yaml_ext_authz_filter():
    ours = envoy_config(CHART / "ci" / "envoy-values.yaml")
    theirs = yaml.safe_load(ENVOY_EXAMPLE.read_text())
    ext_authz = lambda cfg: [f for f in hcm(cfg, "ingress")["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    check(ext_authz(ours) == ext_authz(theirs) != [],
          f"the chart's ext_authz filter differs from deploy/envoy/envoy.yaml's:\n{ext_authz(ours)}\n!=\n{ext_authz(theirs)}")
    routes = lambda cfg: hcm(cfg, "ingress")["route_config"]["virtual_hosts"][0]["routes"]
    check(routes(ours) == routes(theirs), f"the example's routes differ from deploy/envoy/envoy.yaml's:\n{routes(ours)}")
    # The rest of the ingress connection manager too (e.g. stripping client-sent x-keyward-* headers).
    for key in sorted(set(hcm(ours, "ingress")) | set(hcm(theirs, "ingress"))):
        check(hcm(ours, "ingress").get(key) == hcm(theirs, "ingress").get(key),
              f"the ingress listener's {key} differs from deploy/envoy/envoy.yaml's:\n"
              f"{hcm(ours, 'ingress').get(key)}\n!=\n{hcm(theirs, 'ingress').get(key)}")
    kw, kw_theirs = cluster(ours, "keyward"), cluster(theirs, "keyward")
    for key in ("health_checks", "typed_extension_protocol_options", "connect_timeout"):
        check(kw[key] == kw_theirs[key], f"the keyward cluster's {key} differs from deploy/envoy/envoy.yaml's")
    check(kw["type"] == "STRICT_DNS", f"the keyward cluster is {kw['type']}, not STRICT_DNS")
    [ep] = [e["endpoint"]["address"]["socket_address"] for e in kw["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    check(ep["address"] == f"{RELEASE}-headless.{NAMESPACE}.svc.cluster.local" and ep["port_value"] == 50051,
          f"Envoy reaches keyward at {ep}, not the headless Service on 50051")
    docs = render(CHART / "ci" / "envoy-values.yaml")
    check(one(docs, "Service", f"{RELEASE}-headless")["spec"]["clusterIP"] == "None", "no headless Service")
    dep = one(docs, "Deployment", f"{RELEASE}-envoy")
    checksum = dep["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config", "")
    check(len(checksum) == 64, "the Envoy Deployment does not roll on configuration changes")


def envoy_validate(config, tmp):
    path = pathlib.Path(tmp) / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True)
    check(proc.returncode == 0, f"envoy --mode validate refused the chart's Envoy configuration:\n{proc.stdout}{proc.stderr}")


def test_envoy_accepts_the_rendered_configuration():
    with tempfile.TemporaryDirectory() as tmp:
        envoy_validate(envoy_config(CHART / "ci" / "envoy-values.yaml"), tmp)


def test_envoy_accepts_the_rendered_mtls_configuration():
    config = envoy_config(CHART / "ci" / "envoy-values.yaml", CHART / "ci" / "tls-values.yaml",
                          sets=("envoy.keywardTls.secretName=envoy-to-keyward",))
    kw = cluster(config, "keyward")
    tls = kw["transport_socket"]["typed_config"]["common_tls_context"]
    check(tls.get("tls_certificates"), "with mTLS on, Envoy presents no client certificate to keyward")
    with tempfile.TemporaryDirectory() as tmp:
        # Envoy's validate mode reads the certificate files: make real ones.
        san = f"DNS:{RELEASE}-headless.{NAMESPACE}.svc.cluster.local"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "1", "-subj", "/CN=keyward-test", "-addext", f"subjectAltName={san}",
                        "-keyout", f"{tmp}/tls.key", "-out", f"{tmp}/tls.crt"],
                       check=True, capture_output=True)
        shutil.copy(f"{tmp}/tls.crt", f"{tmp}/ca.crt")
        text = yaml.safe_dump(config).replace("/etc/envoy-tls/keyward", tmp)
        envoy_validate(yaml.safe_load(text), tmp)


# --- runner ----------------------------------------------------------------------------------


def main(argv):
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    if argv:
        tests = [(n, f) for n, f in tests if any(a in n for a in argv)]
    passed = failed = 0
    for name, fn in tests:
        try:
            fn()
        except Failure as e:
            failed += 1
            print(f"FAIL {name}: {e}", flush=True)
        except Exception:  # a bug in the test or a tool that did not run
            failed += 1
            print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)
        else:
            passed += 1
            print(f"ok   {name}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not tests else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
