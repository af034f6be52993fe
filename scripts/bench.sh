#!/usr/bin/env bash
# The one benchmark command: builds the release preset, runs every benchmark with the
# baselines measured in the same run, and writes a markdown results table to bench/results.md
# (and prints it). Each program's output is kept in build/release/bench-logs/ (NAME.log: stdout,
# NAME.err: stderr).
#
#   scripts/bench.sh [--quick] [--out FILE]
#
# --quick: fewer samples and iterations (a few minutes instead of ~15). Needs root (runc), umoci,
# nats-server, python3, and mmdebstrap for session_bench's Debian image (built once, then cached;
# scripts/install-deps.sh installs them all). A benchmark that fails or prints
# no figure shows "n/a" in the table; the run goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
out=bench/results.md
while (($# > 0)); do
  case "$1" in
    --quick) quick=1 ;;
    --out) out=$2; shift ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if ((quick)); then
  rtt_samples=500 runc_runs=5 e2e_builds=5 e2e_burst=4 sim_requests=3000 launch_iterations=3
  session_args=(--starts 10 --keys 200 --mib 64)
  gbench_min_time=0.05
else
  rtt_samples=5000 runc_runs=50 e2e_builds=50 e2e_burst=4 sim_requests=20000 launch_iterations=10
  session_args=(--starts 50 --keys 2000 --mib 512)
  gbench_min_time=0.5
fi
sim_nodes=5000

build=build/release
cmake --preset release >/dev/null
cmake --build --preset release -j"$(nproc)" --target \
  cvm-scheduler cvm-gpu-broker cvm-node-agent cvm-supervisor cvm-fleet-sim \
  baseline_bench e2e_latency_bench agent_launch_bench broker_roundtrip_bench \
  broker_decision_bench placement_bench session_bench cvmctl seccomp_bench
logs=$build/bench-logs
rm -rf "$logs"
mkdir -p "$logs"
load_before=$(cut -d" " -f1-3 /proc/loadavg)

# step NAME CMD...: runs CMD with its output in $logs/NAME.log; a failure is noted, not fatal.
step() {
  local name=$1
  shift
  echo "bench: $name: $*"
  local t0=$SECONDS rc=0
  # stdout holds the figures (JSON for Google Benchmark programs); logs go to stderr.
  "$@" >"$logs/$name.log" 2>"$logs/$name.err" || rc=$?
  if ((rc != 0)); then
    echo "bench: $name FAILED (exit $rc), see $logs/$name.log and .err" | tee -a "$logs/failures"
    tail -n 20 "$logs/$name.err" >&2 || true
  fi
  echo "bench: $name took $((SECONDS - t0)) s"
}

# The fleet simulator needs a nats-server of its own (the other programs start theirs).
fleet_sim() {
  local dir port pid rc=0
  dir=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  nats-server -js -sd "$dir/js" -a 127.0.0.1 -p "$port" >"$dir/nats.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
  "$build/tools/fleet-sim/cvm-fleet-sim" --nats-url "nats://127.0.0.1:$port" --nodes "$sim_nodes" \
    --shared-subscription --schedulers 1 --requests "$sim_requests" --window 100 \
    --cpu 100 --memory 67108864 --rtt-samples "$rtt_samples" || rc=$?
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  return "$rc"
}

gbench() { "$@" --benchmark_min_time="$gbench_min_time" --benchmark_format=json; }

# agent_launch_bench again with every file on a journaled ext4 (a loop device), as a node's /var/lib
# is: on a journal-less ext4 such as this project's CI VMs' root, ext4 allocates each new inode past
# every recently deleted one, which makes each Caching-off unpack slower than the last (see the
# bench's header). Both runs are reported; each prints the filesystem it ran on.
journaled_launch() {
  local dir img rc=0
  dir=$(mktemp -d)
  img="$build/journaled-scratch.img"
  if ! { truncate -s 2G "$img" && mkfs.ext4 -q -F "$img" && mount -o loop "$img" "$dir"; }; then
    echo "agent_launch_journaled: could not mount a loop ext4 (mkfs.ext4, loop devices)" >&2
    rm -f "$img"
    rmdir "$dir"
    return 1
  fi
  "$build/bench/agent_launch_bench" --iterations "$launch_iterations" --work-dir "$dir" || rc=$?
  umount "$dir" || true
  rmdir "$dir" || true
  rm -f "$img"
  return "$rc"
}

step baseline "$build/bench/baseline_bench" --samples "$rtt_samples" --runc "$runc_runs"
step e2e "$build/bench/e2e_latency_bench" --builds "$e2e_builds" --burst "$e2e_burst"
step fleet_sim fleet_sim
step agent_launch "$build/bench/agent_launch_bench" --iterations "$launch_iterations"
step agent_launch_journaled journaled_launch
step broker_roundtrip "$build/bench/broker_roundtrip_bench" --benchmark_format=json
step broker_decision gbench "$build/bench/broker_decision_bench"
step placement "$build/bench/placement_bench" --benchmark_min_time="$gbench_min_time"
step scheduler_rss bench/scheduler_rss.sh "$build" "$sim_nodes"
step session "$build/bench/session_bench" "${session_args[@]}"
step seccomp "$build/bench/seccomp_bench"

python3 bench/results_table.py "$logs" "$SECONDS" "$quick" "$load_before" >"$out"
cat "$out"
echo "bench: wrote $out (logs in $logs)"
