#!/usr/bin/env bash
# A cluster of N hosts on this one machine: each host is a network namespace with its own daemon,
# data directory, host name and addresses, all joined by one bridge (the "switch"), and joined into
# one cluster (host 1 inits, the others join with tokens).
#
#   scripts/cluster-sandbox.sh up N [--ttl SECONDS]   start N hosts and form the cluster
#   scripts/cluster-sandbox.sh pid HOST               the daemon pid of HOST (h1, h2, …)
#   scripts/cluster-sandbox.sh start HOST             start HOST's daemon again (after a kill)
#   scripts/cluster-sandbox.sh add HOST               one more host (h4…) with a daemon, in no cluster yet
#   scripts/cluster-sandbox.sh cli HOST ARGS…         run the hyperfold CLI against HOST
#   scripts/cluster-sandbox.sh cut HOST               cut HOST off the others (its link to the switch down)
#   scripts/cluster-sandbox.sh mend HOST              connect it again
#   scripts/cluster-sandbox.sh down                   stop everything and remove all it made
#
# Environment: HYPERFOLD_SANDBOX_DIR (default /dev/shm/hyperfold-sandbox: etcd wants fast disks),
# HYPERFOLD_SANDBOX_NET (default 10.213.0: host i is .i, the switch .254),
# HYPERFOLD_SANDBOX_PREFIX (default hfsb: names of the namespaces and links),
# HYPERFOLD_SANDBOX_IMAGE (a built tiny image directory to copy in instead of building one per host).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BASE="${HYPERFOLD_SANDBOX_DIR:-/dev/shm/hyperfold-sandbox}"
NET="${HYPERFOLD_SANDBOX_NET:-10.213.0}"
P="${HYPERFOLD_SANDBOX_PREFIX:-hfsb}"   # names of namespaces and links (two sandboxes need two prefixes)
SWITCH="$P-sw0"
CLI=("$(command -v node)" "$ROOT/bin/hyperfold.js")

die() { echo "cluster-sandbox: $*" >&2; exit 1; }
ns() { echo "$P-$1"; }
hosts() { [ -d "$BASE" ] && find "$BASE" -mindepth 1 -maxdepth 1 -type d -name 'h*' -printf '%f\n' | sort -V || true; }
# Hosts of this prefix that have a namespace, with or without a directory (a run that failed half-way).
ns_hosts() { { hosts; ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^$P-\(h[0-9]*\)$/\1/p"; } | sort -uV; }
cli() { local h="$1"; shift; "${CLI[@]}" --data-dir "$BASE/$h" "$@"; }

start_daemon() {
  local h="$1" i="${1#h}"
  local dir="$BASE/$h"
  [ -f "$dir/daemon.pid" ] && alive "$(cat "$dir/daemon.pid")" && die "$h is already running (pid $(cat "$dir/daemon.pid"))"
  # `ip netns exec` mounts the namespace's own /sys, which hides the cgroup mounts runc needs: the
  # host's cgroup hierarchies are mounted again (the same hierarchies) in that mount namespace.
  CG="$(findmnt -rn -t cgroup,cgroup2 -o TARGET,FSTYPE,OPTIONS)" ip netns exec "$(ns "$h")" sh -c '
    mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup || exit 1
    echo "$CG" | while read -r t f o; do mkdir -p "$t" && mount -t "$f" -o "$o" "$f" "$t" || exit 1; done || exit 1
    exec "$@"' sh env \
    HYPERFOLD_HOST_NAME="$h" HYPERFOLD_DATA="$dir" HYPERFOLD_LISTEN="$NET.$i:8443" \
    HYPERFOLD_RUNC_ROOT="$dir/runc" \
    setsid "${CLI[@]}" serve --no-build-image >>"$dir/daemon.out" 2>&1 </dev/null &
  echo $! >"$dir/daemon.pid"
  # Ready when the unix socket answers.
  for _ in $(seq 1 200); do
    cli "$h" cluster status --format json >/dev/null 2>&1 && return 0
    alive "$(cat "$dir/daemon.pid")" || { tail -n 30 "$dir/daemon.out" >&2; die "$h's daemon exited"; }
    sleep 0.1
  done
  tail -n 30 "$dir/daemon.out" >&2
  die "$h's daemon did not answer within 20 s"
}

# A pid is alive when /proc says so and it is not a zombie.
alive() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && ! awk '{exit ($3=="Z")?0:1}' "/proc/$1/stat"; }

up() {
  local n="$1"; shift
  local ttl=10
  while [ $# -gt 0 ]; do case "$1" in --ttl) ttl="$2"; shift 2 ;; *) die "unknown option $1" ;; esac; done
  [[ "$n" =~ ^[1-9][0-9]?$ ]] || die "up N: N is a number of hosts (1-99)"
  [ -e "$BASE" ] && die "$BASE exists: run \`$0 down\` first"
  mkdir -p "$BASE"
  ip link add "$SWITCH" type bridge
  ip addr add "$NET.254/24" dev "$SWITCH"
  ip link set "$SWITCH" up
  for i in $(seq 1 "$n"); do
    make_host "h$i"
    start_daemon "h$i"
  done
  cli h1 cluster init --name sandbox --address "$NET.1" --lease-ttl "$ttl" >/dev/null
  for i in $(seq 2 "$n"); do
    local token
    token=$(cli h1 cluster token --ttl 600)
    cli "h$i" cluster join "https://$NET.1:8444" --token "$token" --address "$NET.$i" >/dev/null
  done
  for i in $(seq 1 "$n"); do
    describe "h$i"
  done
}

describe() { echo "$1 url=http://$NET.${1#h}:8443 token=$(cat "$BASE/$1/admin.token") data=$BASE/$1 pid=$(cat "$BASE/$1/daemon.pid")"; }

# A host's namespace on the switch, its data directory and (optionally) the tiny image.
make_host() {
  local h="$1" i="${1#h}" dir="$BASE/$1"
  [[ "$i" =~ ^[1-9][0-9]?$ ]] || die "host names are h1 … h99"
  mkdir -p "$dir"
  ip netns add "$(ns "$h")"
  ip link add "$P-$h" type veth peer name eth0 netns "$(ns "$h")"
  ip link set "$P-$h" master "$SWITCH" up
  ip -n "$(ns "$h")" link set lo up
  ip -n "$(ns "$h")" addr add "$NET.$i/24" dev eth0
  ip -n "$(ns "$h")" link set eth0 up
  ip -n "$(ns "$h")" route add default via "$NET.254"
  if [ -n "${HYPERFOLD_SANDBOX_IMAGE:-}" ]; then
    mkdir -p "$dir/images/tiny"
    cp -a "$HYPERFOLD_SANDBOX_IMAGE/." "$dir/images/tiny/"
  fi
}

down() {
  for h in $(hosts); do
    local pid
    pid=$(cat "$BASE/$h/daemon.pid" 2>/dev/null || true)
    alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
  done
  for h in $(ns_hosts); do
    # Everything left in the host's namespace: guests, dnsmasq, etcd.
    if ip netns list | grep -qw "$(ns "$h")"; then
      for p in $(ip netns pids "$(ns "$h")" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    fi
    if [ -d "$BASE/$h/runc" ]; then
      for c in $(runc --root "$BASE/$h/runc" list -q 2>/dev/null); do runc --root "$BASE/$h/runc" delete -f "$c" >/dev/null 2>&1 || true; done
    fi
  done
  for h in $(ns_hosts); do
    ip netns del "$(ns "$h")" 2>/dev/null || true
    ip link del "$P-$h" 2>/dev/null || true
  done
  ip link del "$SWITCH" 2>/dev/null || true
  # Mounts a daemon left (container root filesystems) go before the files.
  if [ -d "$BASE" ]; then
    { grep -o " $BASE[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$BASE"
  fi
}

case "${1:-}" in
  up) shift; [ $# -ge 1 ] || die "usage: $0 up N [--ttl SECONDS]"; up "$@" ;;
  down) down ;;
  pid) [ -n "${2:-}" ] || die "usage: $0 pid HOST"; cat "$BASE/$2/daemon.pid" ;;
  start) [ -n "${2:-}" ] || die "usage: $0 start HOST"; start_daemon "$2"; describe "$2" ;;
  add) [ -n "${2:-}" ] || die "usage: $0 add HOST"; [ -d "$BASE/$2" ] && die "$2 exists"; make_host "$2"; start_daemon "$2"; describe "$2" ;;
  cli) [ -n "${2:-}" ] || die "usage: $0 cli HOST ARGS…"; h="$2"; shift 2; cli "$h" "$@" ;;
  # The CLI still reaches a cut-off host: it talks to the daemon over its unix socket.
  cut) [ -n "${2:-}" ] || die "usage: $0 cut HOST"; ip link set "$P-$2" down ;;
  mend) [ -n "${2:-}" ] || die "usage: $0 mend HOST"; ip link set "$P-$2" up ;;
  *) die "usage: $0 up N [--ttl S] | down | pid HOST | start HOST | add HOST | cli HOST ARGS… | cut HOST | mend HOST" ;;
esac
