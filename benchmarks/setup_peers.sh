#!/usr/bin/env bash
# Creates the peer libraries' environments that the benchmarks compare against (see
# ../shared/PEERS.md). Each peer gets its own venv under benchmarks/.peers/ because mace-torch
# pins e3nn 0.4.4. torch==2.13.0 (CPU) is installed first everywhere; on a GPU machine name a
# CUDA build instead (TORCH_SPEC, with pip's options for where it comes from in PIP_EXTRA), the
# same as the main venv's, so that `python benchmarks/models.py --device cuda` compares like
# with like.
#
#   bash benchmarks/setup_peers.sh            # all peers
#   bash benchmarks/setup_peers.sh mace       # one of: main mace torchmdnet scatter
#   TORCH_SPEC="torch==2.13.0" PIP_EXTRA="..." bash benchmarks/setup_peers.sh
set -euo pipefail
cd "$(dirname "$0")"
PEERS=.peers
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PIP_EXTRA=${PIP_EXTRA:-}
mkdir -p "$PEERS"

venv() {  # venv NAME: create benchmarks/.peers/NAME with $TORCH_SPEC
    if [ ! -x "$PEERS/$1/bin/python" ]; then
        "$PYTHON" -m venv "$PEERS/$1"
        "$PEERS/$1/bin/pip" install -q --disable-pip-version-check --upgrade pip setuptools wheel
        # shellcheck disable=SC2086  # PIP_EXTRA: several options, split on purpose
        "$PEERS/$1/bin/pip" install -q --disable-pip-version-check $PIP_EXTRA "$TORCH_SPEC"
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
