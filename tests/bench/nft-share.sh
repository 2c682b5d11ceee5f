#!/bin/bash
# The forward benchmark under `perf`, and uplinkd's per-packet cost estimated from the share
# of the machine's busy CPU spent inside nf_tables chains (nft_do_chain_inet/_ipv4/_ipv6 and
# what they call: uplinkd's and the sink's inet chains, bare's ip chain), in the uplinkd
# runs and in the bare runs. A share does not move when the
# hypervisor slows the whole machine down, which the rates do by ±20 % here.
#
# If the rest of a packet's path costs the same in both, the rate ratio is
# (1 - share_uplinkd) / (1 - share_bare).
#
# usage (as root, after `cargo build --release --workspace`):
#   tests/bench/nft-share.sh [CLIENTS] [UPLINKD_BIN] [--client-usage | --passive-dests]
set -euo pipefail
clients=${1:-100000}
bin=${2:-target/release/uplinkd}
extra=${3:-}
data=$(mktemp /tmp/nft-share.XXXXXX)
trap 'rm -f "$data" "$data.old"' EXIT
command -v perf >/dev/null || { echo "nft-share: needs perf (Debian: linux-perf)" >&2; exit 2; }
perf record -q -a -g -e cpu-clock -o "$data" -- \
    env UPLINKD_BIN="$bin" target/release/uplink-bench forward --clients "$clients" --seconds 6 --runs 2 $extra |
    grep -E "machine|paired"
# Per second: samples, busy samples, busy samples inside nft chains, samples inside an nft
# chain on the forward hook (uplinkd's accounting chain; bare and the sink have none: they
# mark the uplinkd runs).
perf script -i "$data" -F time,ip,sym 2>/dev/null | awk '
function flush() { tot[t]++; if (!idle) { busy[t]++; if (nft) innft[t]++ }; if (nft && fwd) marks[t]++ }
/^ *[0-9]+\.[0-9]+:/ { if (open) flush(); open = 1; t = int($1); idle = nft = fwd = 0; next }
/pv_native_safe_halt|default_idle|intel_idle|acpi_idle/ { idle = 1 }
/nft_do_chain_(inet|ipv4|ipv6)/ { nft = 1 }
/ip_forward/ { fwd = 1 }
/^$/ { if (open) flush(); open = 0 }
END {
    if (open) flush()
    for (s in tot) {
        # Whole seconds of a run only: the sender keeps one CPU of the machine busy.
        if (busy[s] < 0.4 * tot[s]) continue
        if (marks[s] > 20) { u += innft[s]; ub += busy[s] } else if (marks[s] == 0) { b += innft[s]; bb += busy[s] }
    }
    if (!ub || !bb) { print "nft-share: no uplinkd or no bare seconds in the profile" > "/dev/stderr"; exit 1 }
    su = u / ub; sb = b / bb
    printf "busy CPU inside nft chains: uplinkd %.1f %%, bare %.1f %% -> uplinkd %.3fx bare (estimated)\n", 100 * su, 100 * sb, (1 - su) / (1 - sb)
}'
