#!/usr/bin/env bash
# Builds the uplinkd image from this tree's release binaries (target/release), on any base
# image that is present locally or pullable: the exact binaries that ship, no registry needed
# for the Rust toolchain.
#
#   bash deploy/build-image.sh --base IMAGE --tag TAG [--no-build]
set -euo pipefail
usage() {
  echo "usage: $0 --base IMAGE --tag TAG [--no-build]" >&2
  echo "  --base IMAGE  the runtime base, e.g. docker.io/library/debian:bookworm-slim" >&2
  echo "  --tag TAG     the image to create, e.g. localhost/uplinkd:0.1.0" >&2
  echo "  --no-build    use target/release as it is (default: cargo build --release first)" >&2
  exit 2
}
base= tag= build=1
while (($#)); do
  case $1 in
    --base) base=${2:-}; shift 2 || usage ;;
    --tag) tag=${2:-}; shift 2 || usage ;;
    --no-build) build=0; shift ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ -n $base && -n $tag ]] || usage
cd "$(dirname "$0")/.."
command -v podman >/dev/null || { echo "podman not found (apt-get install podman)" >&2; exit 1; }
if ((build)); then
  echo "== cargo build --release (uplinkd, uplinkctl)" >&2
  cargo build --release --locked -p uplinkd -p uplinkctl
fi
release=${CARGO_TARGET_DIR:-target}/release
for b in uplinkd uplinkctl; do
  [[ -x $release/$b ]] || { echo "$release/$b missing: run cargo build --release" >&2; exit 1; }
done
# A context of just the two binaries (not the multi-GB target directory).
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$release/uplinkd" "$release/uplinkctl" "$ctx/"
echo "== podman build $tag on $base" >&2
# chroot isolation: RUN steps work even where podman cannot run containers (no rlimits).
podman build --isolation="${BUILDAH_ISOLATION:-chroot}" --target prebuilt \
  --build-arg "BASE_IMAGE=$base" -f deploy/Containerfile -t "$tag" "$ctx"
podman image inspect --format '{{.Size}}' "$tag" | awk -v t="$tag" '{printf "%s: %.1f MB\n", t, $1/1e6}'
