#!/usr/bin/env bash
# Test tools for tests/test_deploy.py that cannot live in the project's own virtualenv:
#   checkov   PyPI, in its own virtualenv: its pins (e.g. packaging<24) clash with the project's.
#   promtool  from Debian's `prometheus` package: downloaded with apt-get and only promtool
#             unpacked; nothing is installed system-wide and no Prometheus server runs.
# Both land in $VENV/tools/bin, where the tests look first. Idempotent and quiet: a no-op when
# the tools are there. Where a tool cannot be had, it says so and the tests that need it skip.
#   usage: VENV=.venv PYTHON=python3 bash scripts/install-test-tools.sh
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CHECKOV_VERSION=3.3.30
TOOLS="$VENV/tools"
BIN="$TOOLS/bin"
mkdir -p "$BIN"

# ---- checkov ------------------------------------------------------------------------------
stamp="$TOOLS/checkov/.installed-$CHECKOV_VERSION"
if [ ! -f "$stamp" ]; then
    rm -rf "$TOOLS/checkov"
    log=$(mktemp)
    if "$PYTHON" -m venv "$TOOLS/checkov" >"$log" 2>&1 \
        && "$TOOLS/checkov/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION" >"$log" 2>&1; then
        touch "$stamp"
    else
        cat "$log" >&2
        echo "install-test-tools: could not install checkov $CHECKOV_VERSION; its checks will be skipped" >&2
        rm -rf "$TOOLS/checkov"
    fi
    rm -f "$log"
fi
if [ -f "$stamp" ]; then
    ln -sf ../checkov/bin/checkov "$BIN/checkov"
fi

# ---- promtool -----------------------------------------------------------------------------
fetch_promtool() {
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $tmp now
    trap "rm -rf '$tmp'" RETURN
    chmod 755 "$tmp"  # apt's download user must be able to write here
    if ! (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); then
        # No package lists yet (a fresh machine): fetch them, which needs root.
        [ "$(id -u)" -eq 0 ] || return 1
        apt-get update -qq >/dev/null 2>&1 || return 1
        (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) || return 1
    fi
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool || return 1
    install -m 0755 "$tmp/usr/bin/promtool" "$BIN/promtool"
}
if [ ! -x "$BIN/promtool" ]; then
    if command -v promtool >/dev/null 2>&1; then
        ln -sf "$(command -v promtool)" "$BIN/promtool"
    elif command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
        fetch_promtool || echo "install-test-tools: could not fetch promtool (Debian package prometheus); its checks will be skipped" >&2
    else
        echo "install-test-tools: no promtool and no apt-get to fetch it; its checks will be skipped" >&2
    fi
fi
