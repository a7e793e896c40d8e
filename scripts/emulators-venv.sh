#!/usr/bin/env bash
# Creates the virtualenvs of the local Google Cloud emulators, apart from the
# project's own: bqemulator pins DuckDB and its extensions to versions that
# need not match the project's, and the storage emulator brings its own web stack.
#
#   scripts/emulators-venv.sh            # both
#   scripts/emulators-venv.sh bq         # only .venv-bqemu
#   scripts/emulators-venv.sh gcs        # only .venv-gcs
#
# Idempotent: a venv whose marker file exists is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BQ_VENV="${BQEMU_VENV:-$ROOT/.venv-bqemu}"
GCS_VENV="${GCS_EMULATOR_VENV:-$ROOT/.venv-gcs}"
BQEMULATOR_VERSION="${BQEMULATOR_VERSION:-1.4.0}"
GCS_EMULATOR_VERSION="${GCS_EMULATOR_VERSION:-2026.7.19}"
DUCKDB_VERSION="1.5.5"
what="${1:-all}"

# A venv is reused only if its marker names the same packages: changing a pin here
# upgrades existing venvs on the next run.
is_ready() { [[ -f "$1/.ready" && "$(cat "$1/.ready")" == "$2" ]]; }

make_bq() {
  # bqemulator registers Python UDFs in DuckDB, which need numpy at start-up.
  local spec="bqemulator==$BQEMULATOR_VERSION duckdb==$DUCKDB_VERSION duckdb-extensions==$DUCKDB_VERSION duckdb-extension-spatial==$DUCKDB_VERSION numpy"
  if is_ready "$BQ_VENV" "$spec"; then return; fi
  [[ -x "$BQ_VENV/bin/pip" ]] || "$PYTHON" -m venv "$BQ_VENV"
  # shellcheck disable=SC2086
  "$BQ_VENV/bin/pip" install --quiet --disable-pip-version-check $spec
  # bqemulator loads the spatial extension at start and would download it; import the
  # packaged copy once so DuckDB finds it in its extension folder under this HOME.
  local home="$BQ_VENV/home"
  mkdir -p "$home"
  HOME="$home" "$BQ_VENV/bin/python" -c \
    "import duckdb_extensions; duckdb_extensions.import_extension('spatial')"
  echo "$spec" > "$BQ_VENV/.ready"
}

make_gcs() {
  local spec="gcp-storage-emulator==$GCS_EMULATOR_VERSION"
  if is_ready "$GCS_VENV" "$spec"; then return; fi
  [[ -x "$GCS_VENV/bin/pip" ]] || "$PYTHON" -m venv "$GCS_VENV"
  "$GCS_VENV/bin/pip" install --quiet --disable-pip-version-check "$spec"
  echo "$spec" > "$GCS_VENV/.ready"
}

case "$what" in
  all) make_bq; make_gcs ;;
  bq) make_bq ;;
  gcs) make_gcs ;;
  *) echo "usage: $0 [all|bq|gcs]" >&2; exit 2 ;;
esac
