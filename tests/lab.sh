#!/usr/bin/env bash
# The lab: installs what is missing, builds, and runs a namespace topology with uplinkd on
# a gateway with three uplinks and six clients. Prints which uplink each client's traffic
# left by; Ctrl-C tears everything down. Needs root (re-runs itself through sudo if needed).
set -euo pipefail
. "$(dirname "$0")/../.ci/as-root"
cd "$(dirname "$0")/.."
echo "lab: installing what it needs (when missing)..." >&2
bash .ci/install-deps
echo "lab: building uplink (release; the first build takes a few minutes)..." >&2
cargo build --release --workspace --bins
echo "lab: starting" >&2
exec target/release/uplink-lab "$@"
