#!/usr/bin/env bash
# THE test command: builds the converter, runs the Rust tests, then the Python
# interop suite (tests/python) against the release binary.
#
#   bash tests/run-all.sh [extra pytest args]
#
# Works from a fresh clone on a fresh Debian machine: creates .venv-tests/ in the
# repository root (installing python3-venv with apt-get if the venv module is
# missing) and installs tests/python/requirements.txt into it.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv-tests"
PY="${PYTHON:-python3}"

log() { printf '\n==> %s\n' "$*"; }

# ---------------------------------------------------------------- virtualenv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "creating virtualenv $VENV"
    rm -rf "$VENV"
    if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
        log "python venv module missing: installing python3-venv"
        rm -rf "$VENV"
        export DEBIAN_FRONTEND=noninteractive
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
        $SUDO apt-get update -qq
        pyver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        $SUDO apt-get install -y -qq python3-venv "python${pyver}-venv" >/dev/null 2>&1 \
            || $SUDO apt-get install -y -qq python3-venv
        "$PY" -m venv "$VENV"
    fi
fi

REQ="$ROOT/tests/python/requirements.txt"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    log "installing Python test requirements"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ"
    echo "$want" > "$STAMP"
fi

# ---------------------------------------------------------------- Rust
log "cargo build --release"
if [ -f Cargo.lock ]; then
    cargo build --release --locked
else
    cargo build --release
fi

log "cargo test --release"
if [ -f Cargo.lock ]; then
    cargo test --release --locked
else
    cargo test --release
fi

# ---------------------------------------------------------------- Python interop suite
export SENSORIUM_INGEST_BIN="${SENSORIUM_INGEST_BIN:-$ROOT/target/release/sensorium-ingest}"
log "pytest tests/python (binary: $SENSORIUM_INGEST_BIN)"
# Modules run in parallel, each whole in one worker (`loadfile`): a module's servers (S3,
# SLURM) and fixtures stay in one process, and tests that share a store stay in order.
"$VENV/bin/python" -m pytest tests/python -p no:cacheprovider -n auto --maxprocesses 4 \
    --dist loadfile "$@"
