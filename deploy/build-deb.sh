#!/usr/bin/env bash
# Builds target/debian/uplink_<version>_amd64.deb with cargo-deb: uplinkd, uplinkctl, the
# systemd unit (not enabled on install), /etc/uplink/uplinkd.toml as a conffile, the state
# directory, uplinkctl's completions; depends on nftables and conntrack.
#
#   bash deploy/build-deb.sh [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
case ${1:-} in
  --no-build) build=0 ;;
  "") ;;
  *) echo "usage: $0 [--no-build]   (--no-build: package target/release as it is)" >&2; exit 2 ;;
esac
if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb (cargo install --locked cargo-deb; a few minutes)" >&2
  cargo install --locked cargo-deb
fi
if ((build)); then
  echo "== cargo build --release (uplinkd, uplinkctl)" >&2
  cargo build --release --locked -p uplinkd -p uplinkctl
fi
release=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$release/completions"
"$release/uplinkctl" completion bash >"$release/completions/uplinkctl.bash"
"$release/uplinkctl" completion zsh >"$release/completions/_uplinkctl"
"$release/uplinkctl" completion fish >"$release/completions/uplinkctl.fish"
cargo deb -p uplinkd --no-build --output "${CARGO_TARGET_DIR:-target}/debian/"
