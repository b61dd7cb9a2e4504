#!/usr/bin/env bash
# A cluster on one machine: P hosts, each a network namespace with one address and one link to a
# switch (a Linux bridge in a namespace of its own), every link shaped to RATE in both directions.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/netlab.sh COMMAND ...

  up P RATE [--burst BYTES]   make hosts h0..h(P-1) on one switch, each link shaped to RATE both
                              ways (tc tbf), then check the shaping; replaces a lab already up
  rate RATE [--burst BYTES]   reshape every link of the lab that is up
  check                       measure the shaping: 2 s of bulk transfer h0 -> h1 must reach 90% of
                              RATE (NETLAB_MIN_FRACTION),
                              and a 118 KB message (a VGG-16 sparse set) must not pass faster
                              than the rate and bucket allow
  run H CMD...                run CMD on host H (in its namespace, as this user)
  addr H                      print host H's address
  hosts                       print every host's address, one a line (a hostfile)
  with P RATE [--burst B] -- CMD...
                              up, run CMD here (NETLAB_HOSTS and NETLAB_RATE set), then down,
                              also when CMD fails or the script is interrupted
  down                        remove everything the lab made (idempotent)
  status                      what is up

RATE is tc's syntax: 100mbit, 1gbit, 2500mbit, ... The bucket (tbf burst) defaults to 2 ms of
line rate, at least 16 KB: a larger bucket lets a whole sparse message through at once and
flatters exactly the small messages gTop-k and Top-k send. The queue holds 100 ms of line rate,
at least 1000 full packets.

Hosts are at 10.77.0.1 .. 10.77.0.P (host H at 10.77.0.(H+1)); names start with $NETLAB_PREFIX
(default gtl): namespaces gtl-h0.., gtl-sw. Every link is made inside the lab's namespaces, so
the machine's own interfaces are never touched and no traffic can leave them. Needs root, ip
and tc (iproute2).
EOF
}

PREFIX=${NETLAB_PREFIX:-gtl}
NET=10.77.0
SW="$PREFIX-sw"
STATE_DIR=${NETLAB_STATE:-/run/netlab-$PREFIX}

die() {
    echo "netlab.sh: $*" >&2
    exit 2
}

need_tools() {
    [[ $(id -u) == 0 ]] || die "needs root (network namespaces and tc); run it as root"
    command -v ip >/dev/null || die "needs 'ip' (Debian: apt-get install iproute2)"
    command -v tc >/dev/null || die "needs 'tc' (Debian: apt-get install iproute2)"
}

ns() { echo "$PREFIX-h$1"; }
addr() { echo "$NET.$(($1 + 1))"; }

# Bytes per second of a tc rate such as 100mbit, 1gbit, 2.5gbit, 800kbit (decimal, as tc reads it).
rate_bytes() {
    local r=${1,,}
    python3 - "$r" <<'PY'
import re, sys
m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)", sys.argv[1])
if not m:
    sys.exit(1)
n, u = float(m.group(1)), m.group(2)
bits = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
byts = {"bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
print(int(n * (bits.get(u) or byts[u]) / 8))
PY
}

default_burst() {
    local bps=$1
    local b=$((bps / 500)) # 2 ms of line rate
    ((b < 16384)) && b=16384
    echo "$b"
}

hosts_up() {
    [[ -f $STATE_DIR/hosts ]] && cat "$STATE_DIR/hosts" || echo 0
}

# The queue behind the shaper: 100 ms of line rate, at least 1000 full packets (what a NIC's ring
# and Linux's default qdisc hold). A shorter one drops in TCP's slow start at low rates, and a
# retransmission timeout then costs a short transfer a fifth of its rate or more.
queue_bytes() {
    local q=$(($1 / 10))
    ((q < 1514000)) && q=1514000
    echo "$q"
}

shape() {
    local rate=$1 burst=$2 p limit
    p=$(hosts_up)
    ((p > 0)) || die "no lab is up (scripts/netlab.sh up P RATE)"
    limit=$(queue_bytes "$(rate_bytes "$rate")")
    for ((h = 0; h < p; h++)); do
        # Host egress (its upload) and the switch port's egress (its download).
        ip netns exec "$(ns "$h")" tc qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" limit "$limit"
        ip netns exec "$SW" tc qdisc replace dev "p$h" root tbf rate "$rate" burst "$burst" limit "$limit"
    done
    echo "$rate" >"$STATE_DIR/rate"
    echo "$burst" >"$STATE_DIR/burst"
}

parse_burst() {
    # $1: rate; rest: optional --burst BYTES. Prints the burst.
    local rate=$1
    shift
    local bps burst=""
    bps=$(rate_bytes "$rate") || die "rate '$rate' is not a tc rate (e.g. 100mbit, 1gbit)"
    ((bps > 0)) || die "rate '$rate' is zero"
    if (($# > 0)); then
        [[ $1 == --burst && $# == 2 && $2 =~ ^[0-9]+$ ]] || die "expected --burst BYTES, got '$*'"
        burst=$2
        ((burst >= 1600)) || die "--burst $burst: at least one full packet (1600 bytes)"
    fi
    echo "${burst:-$(default_burst "$bps")}"
}

down() {
    local n found=0
    for n in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        if [[ $n == "$SW" || $n =~ ^$PREFIX-h[0-9]+$ ]]; then
            ip netns del "$n" 2>/dev/null || true
            found=1
        fi
    done
    rm -rf "$STATE_DIR"
    ((found)) && echo "netlab: down" >&2
    return 0
}

up() {
    local p=$1 rate=$2
    shift 2
    [[ $p =~ ^[0-9]+$ ]] && ((p >= 2 && p <= 250)) || die "P = '$p': expected 2..250 hosts"
    local burst
    burst=$(parse_burst "$rate" "$@")
    down
    # Whatever fails from here on leaves nothing behind.
    trap 'down; exit 130' INT TERM
    trap 'rc=$?; if ((rc != 0)); then down; fi' EXIT
    mkdir -p "$STATE_DIR"
    ip netns add "$SW" || die "cannot create a network namespace (ip netns add): this machine does not allow it"
    ip -n "$SW" link add br0 type bridge
    ip -n "$SW" link set br0 up
    ip -n "$SW" link set lo up
    for ((h = 0; h < p; h++)); do
        local n
        n=$(ns "$h")
        ip netns add "$n"
        # Both ends are born inside the lab's namespaces.
        ip -n "$SW" link add "p$h" type veth peer name eth0 netns "$n"
        ip -n "$SW" link set "p$h" master br0
        ip -n "$SW" link set "p$h" up
        ip -n "$n" addr add "$(addr "$h")/24" dev eth0
        ip -n "$n" link set eth0 up
        ip -n "$n" link set lo up
    done
    echo "$p" >"$STATE_DIR/hosts"
    shape "$rate" "$burst"
    echo "netlab: $p hosts at $NET.1-$NET.$p, every link $rate both ways (tbf burst $burst bytes, queue $(queue_bytes "$(rate_bytes "$rate")") bytes)" >&2
    check
    trap - INT TERM EXIT
}

# One TCP transfer from h0 to h1 of `bytes`, after a connection warmed with `warm` bytes; prints
# the receiver's seconds from the message's first byte sent to its last received.
transfer() {
    local bytes=$1 warm=$2 port=$((20000 + RANDOM % 20000))
    local out
    out=$(mktemp)
    ip netns exec "$(ns 1)" python3 - "$port" "$bytes" "$warm" >"$out" <<'PY' &
import socket, struct, sys, time
port, n, warm = map(int, sys.argv[1:])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(1); s.settimeout(60)
c, _ = s.accept(); c.settimeout(60)
def take(m):
    got = 0
    while got < m:
        b = c.recv(min(1 << 20, m - got))
        if not b: raise SystemExit("closed early")
        got += len(b)
take(warm)
c.sendall(b"g")
take(n)
# CLOCK_MONOTONIC is the machine's, the same in every namespace: the sender's start and this end
# are on one clock, so no wake-up delay of this side shortens the time.
print(f"{time.monotonic():.6f}")
c.sendall(b"d")
PY
    local rx=$! start
    sleep 0.3
    start=$(ip netns exec "$(ns 0)" python3 - "$(addr 1)" "$port" "$bytes" "$warm" <<'PY'
import socket, sys, time
host, port, n, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for _ in range(50):
    try:
        c = socket.create_connection((host, port), timeout=60); break
    except OSError:
        time.sleep(0.1)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.sendall(bytes(warm))
assert c.recv(1) == b"g"
time.sleep(0.2)            # let the bucket fill again, as between two steps
print(f"{time.monotonic():.6f}", flush=True)
c.sendall(bytes(n))
assert c.recv(1) == b"d"
PY
    )
    wait "$rx"
    python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.6f}")' "$start" "$(cat "$out")"
    rm -f "$out"
}

check() {
    local p rate burst bps
    p=$(hosts_up)
    ((p >= 2)) || die "no lab is up (scripts/netlab.sh up P RATE)"
    rate=$(cat "$STATE_DIR/rate")
    burst=$(cat "$STATE_DIR/burst")
    bps=$(rate_bytes "$rate")
    local bulk=$((2 * bps > 4000000 ? 2 * bps : 4000000))
    ((bulk > 268435456)) && bulk=268435456
    local t small=118000
    t=$(transfer "$bulk" 1000000)
    local st
    st=$(transfer "$small" 1000000)
    python3 - "$rate" "$bps" "$bulk" "$t" "$small" "$st" "$burst" <<'PY'
import os, sys
rate, bps, bulk, t, small, st, burst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
got = bulk / t
frac = got / bps
print(f"netlab check: h0 -> h1 {bulk / 1e6:.1f} MB in {t:.3f} s = {got * 8 / 1e6:.1f} Mbit/s, {100 * frac:.1f}% of {rate}")
line = small / bps
floor = max(small - burst, 0) / bps
print(f"netlab check: a {small // 1000} KB message in {st * 1e3:.2f} ms; line rate needs {line * 1e3:.2f} ms, "
      f"the bucket ({burst} bytes) allows {floor * 1e3:.2f} ms at the least")
bad = []
want = float(os.environ.get("NETLAB_MIN_FRACTION", "0.90"))
if frac < want:
    bad.append(f"bulk transfer at {100 * frac:.1f}% of the rate (want >= {100 * want:.0f}%): the CPU or the bucket limits it")
if st < 0.95 * floor:
    bad.append("the small message passed faster than the shaping allows: the bucket is not what was asked")
for b in bad:
    print(f"netlab check: FAILED: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

cmd=${1:-}
(($# > 0)) && shift
case "$cmd" in
    up)
        need_tools
        (($# >= 2)) || die "usage: up P RATE [--burst BYTES]"
        up "$@"
        ;;
    rate)
        need_tools
        (($# >= 1)) || die "usage: rate RATE [--burst BYTES]"
        b=$(parse_burst "$@")
        shape "$1" "$b"
        echo "netlab: every link $1 both ways (tbf burst $b bytes)" >&2
        ;;
    check)
        need_tools
        check
        ;;
    run)
        need_tools
        (($# >= 2)) || die "usage: run H CMD..."
        h=$1
        shift
        [[ $h =~ ^[0-9]+$ ]] && ((h < $(hosts_up))) || die "no host h$h in the lab ($(hosts_up) hosts up)"
        exec ip netns exec "$(ns "$h")" "$@"
        ;;
    addr)
        (($# == 1)) && [[ $1 =~ ^[0-9]+$ ]] || die "usage: addr H"
        ((${1} < $(hosts_up))) || die "no host h$1 in the lab ($(hosts_up) hosts up)"
        addr "$1"
        ;;
    hosts)
        p=$(hosts_up)
        for ((h = 0; h < p; h++)); do addr "$h"; done
        ;;
    with)
        need_tools
        (($# >= 4)) || die "usage: with P RATE [--burst B] -- CMD..."
        p=$1 rate=$2
        shift 2
        opts=()
        while (($# > 0)) && [[ $1 != -- ]]; do
            opts+=("$1")
            shift
        done
        [[ ${1:-} == -- ]] || die "with: the command goes after --"
        shift
        (($# > 0)) || die "with: no command after --"
        trap 'down; exit 130' INT TERM
        trap 'down' EXIT
        up "$p" "$rate" "${opts[@]}"
        trap 'down; exit 130' INT TERM
        trap 'down' EXIT
        NETLAB_HOSTS=$p NETLAB_RATE=$rate NETLAB_PREFIX=$PREFIX "$@"
        ;;
    down)
        need_tools
        down
        ;;
    status)
        p=$(hosts_up)
        if ((p > 0)); then
            echo "$p hosts, every link $(cat "$STATE_DIR/rate") (tbf burst $(cat "$STATE_DIR/burst") bytes)"
        else
            echo "no lab is up"
        fi
        ;;
    -h | --help | help) usage ;;
    "") usage >&2; exit 2 ;;
    *) die "unknown command '$cmd' (see --help)" ;;
esac
