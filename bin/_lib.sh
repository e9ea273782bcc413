# Shared helpers for the scripts in bin/ (sourced, not run).
# shellcheck shell=bash
set -euo pipefail
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Load .env without overriding what the caller already exported (KEY=VALUE
# lines; `export`, surrounding quotes and comments are handled like dotenvy).
load_env() {
  [[ -f "$ROOT/.env" ]] || return 0
  local line key value
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
    key=${BASH_REMATCH[2]} value=${BASH_REMATCH[3]}
    if [[ $value =~ ^\"(.*)\"[[:space:]]*$ || $value =~ ^\'(.*)\'[[:space:]]*$ ]]; then
      value=${BASH_REMATCH[1]}
    else
      value=${value%%[[:space:]]#*}; value=${value%"${value##*[![:space:]]}"}
    fi
    [[ -n ${!key+x} ]] || export "$key=$value"
  done < "$ROOT/.env"
}

# The PostgreSQL binaries (initdb, pg_ctl, ...) of the newest installed server.
pg_bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [[ -n $d ]] || d=$(pg_config --bindir 2>/dev/null || true)
  [[ -n $d && -x $d/initdb ]] || die "no PostgreSQL server binaries found; install them (Debian: apt-get install postgresql) or set DATABASE_URL to a running server"
  printf '%s\n' "$d"
}

# Print the URL with the password masked.
redact() { sed -E 's#(://[^:/@]*:)[^@]*@#\1***@#; s#([?&]password=)[^&]*#\1***#g' <<<"$1"; }

# Make sure DATABASE_URL is set and its server answers: bin/dev-db keeps a URL
# that answers and otherwise finds or starts a local server.
ensure_database_url() {
  load_env
  DATABASE_URL=$("$ROOT/bin/dev-db")
  export DATABASE_URL
}

# The db-* binaries: prebuilt in WORKFLOW_DB_BIN_DIR when that is set (the
# test suite's, or ~/.cargo/bin after `cargo install --path . --features cli`),
# else built by build_bins into cargo's target directory (CARGO_TARGET_DIR).
BIN_DIR="${WORKFLOW_DB_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}"
build_bins() { # build_bins [cargo build args...], e.g. --bin db-reset
  [[ -n ${WORKFLOW_DB_BIN_DIR:-} ]] && return 0
  cargo build --features cli --locked "$@" >&2
}

# Run psql against the maintenance database of the server in $1 (a URL).
maintenance_url() {
  python3 - "$1" <<'PY'
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
q = [(k, v) for k, v in u.parse_qsl(p.query, keep_blank_values=True) if k != "dbname"]
print(u.urlunsplit((p.scheme, p.netloc, "/postgres", u.urlencode(q), p.fragment)))
PY
}

with_database() {
  python3 - "$1" "$2" <<'PY'
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
q = [(k, v) for k, v in u.parse_qsl(p.query, keep_blank_values=True) if k != "dbname"]
print(u.urlunsplit((p.scheme, p.netloc, "/" + u.quote(sys.argv[2]), u.urlencode(q), p.fragment)))
PY
}

# Create a scratch database on the server of DATABASE_URL, store its URL in the
# variable named by $2 (no subshell, so the EXIT trap knows to drop it). Named
# like every throwaway database of the repository (see src/testing.rs):
# workflow_db_tmp_gate_<unix seconds>_<pid>_<n>; one a crashed run leaves is
# swept by the next test run once it is an hour old and nobody is connected.
SCRATCH_DBS=()
drop_scratch_dbs() {
  local db
  for db in "${SCRATCH_DBS[@]}"; do
    psql -X -q "$(maintenance_url "$DATABASE_URL")" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  done
}
trap drop_scratch_dbs EXIT
scratch_db() { # scratch_db LABEL VAR (the label only names it in logs)
  local name="workflow_db_tmp_gate_$(date +%s)_$$_${#SCRATCH_DBS[@]}"
  log "scratch database for $1: $name"
  psql -X -q -v ON_ERROR_STOP=1 "$(maintenance_url "$DATABASE_URL")" \
    -c "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" -c "CREATE DATABASE \"$name\"" >/dev/null
  SCRATCH_DBS+=("$name")
  printf -v "$2" '%s' "$(with_database "$DATABASE_URL" "$name")"
}

# squawk (migration lint) from PyPI; works with a system Python that refuses
# global installs (PEP 668) by falling back to a user install.
ensure_squawk() {
  export PATH="$HOME/.local/bin:$PATH"
  command -v squawk >/dev/null 2>&1 && return 0
  log "installing squawk-cli from PyPI..."
  python3 -m pip install --quiet squawk-cli 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages squawk-cli \
    || die "cannot install squawk-cli (needs python3 with pip: apt-get install python3-pip)"
}

# diesel_cli (postgres only), installed once into ~/.cargo/bin.
DIESEL_CLI_VERSION=2.3.14
ensure_diesel_cli() {
  if ! command -v diesel >/dev/null 2>&1 || ! diesel --version 2>/dev/null | grep -q "$DIESEL_CLI_VERSION"; then
    log "installing diesel_cli $DIESEL_CLI_VERSION (postgres only)..."
    cargo install diesel_cli --version "=$DIESEL_CLI_VERSION" --no-default-features --features postgres --locked >&2
  fi
}
