#!/usr/bin/env bash
# Creates the peer libraries' environments that the benchmarks compare against (see
# ../shared/PEERS.md). Each peer gets its own venv under benchmarks/.peers/ because mace-torch
# pins e3nn 0.4.4. torch==2.13.0 (CPU) is installed first everywhere.
#
#   bash benchmarks/setup_peers.sh            # all peers
#   bash benchmarks/setup_peers.sh mace       # one of: main mace torchmdnet scatter
set -euo pipefail
cd "$(dirname "$0")"
PEERS=.peers
PYTHON=${PYTHON:-python3}
mkdir -p "$PEERS"

venv() {  # venv NAME: create benchmarks/.peers/NAME with torch==2.13.0
    if [ ! -x "$PEERS/$1/bin/python" ]; then
        "$PYTHON" -m venv "$PEERS/$1"
        "$PEERS/$1/bin/pip" install -q --disable-pip-version-check --upgrade pip setuptools wheel
        "$PEERS/$1/bin/pip" install -q --disable-pip-version-check torch==2.13.0
    fi
}

setup_main() {  # peers that sit beside molnets in the project's own venv
    ../.venv/bin/pip install -q --disable-pip-version-check "matscipy==1.3.1" "torch-geometric==2.8.1"
}

setup_mace() {
    venv mace
    "$PEERS/mace/bin/pip" install -q --disable-pip-version-check "mace-torch==0.3.16" "matscipy==1.3.1"
}

setup_torchmdnet() {
    venv torchmdnet
    "$PEERS/torchmdnet/bin/pip" install -q --disable-pip-version-check "torchmd-net==3.1.0"
}

setup_scatter() {  # torch_scatter builds from source: only to show molnets does not need it
    venv scatter
    "$PEERS/scatter/bin/pip" install -q --disable-pip-version-check ninja
    "$PEERS/scatter/bin/pip" install -q --disable-pip-version-check --no-build-isolation torch-scatter
}

for peer in "${@:-main mace torchmdnet scatter}"; do
    for p in $peer; do "setup_$p"; done
done
