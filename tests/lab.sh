#!/usr/bin/env bash
# The lab: installs what is missing, builds, and runs a namespace topology with uplinkd on
# a gateway with three uplinks and six clients. Prints which uplink each client's traffic
# left by; Ctrl-C tears everything down. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the lab builds network namespaces: run it as root (sudo $0)" >&2
  exit 1
fi
bash .ci/install-deps
cargo build --release --workspace --bins
exec target/release/uplink-lab "$@"
