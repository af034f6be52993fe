#!/usr/bin/env bash
# Scheduler memory with a large fleet registered (target: RSS <= 200 MiB at 50,000 nodes).
# Starts its own nats-server, the real cvm-scheduler, and cvm-fleet-sim --register-only; reports
# the scheduler's VmRSS before any node (the baseline of the same run) and once its index holds
# every node (read from its own /metrics gauge cvm_scheduler_nodes).
# Usage: bench/scheduler_rss.sh BUILD_DIR [NODES]
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR [NODES]}
nodes=${2:-50000}
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
. "$(dirname "$0")/lib.sh"
metrics_port=$(free_port)
start_nats "$dir"
pids+=("$nats_pid")
"$build/services/scheduler/cvm-scheduler" --nats-url "$url" --metrics-listen "127.0.0.1:$metrics_port" \
  --node-ttl 3600 --log-level warn >"$dir/scheduler.log" 2>&1 &
sched=$!
pids+=($sched)
gauge() { curl -s "http://127.0.0.1:$metrics_port/metrics" | awk '/^cvm_scheduler_nodes /{print $2}'; }
rss_kib() { awk '/^VmRSS/{print $2}' "/proc/$sched/status"; }
for _ in $(seq 200); do [ -n "$(gauge || true)" ] && break; sleep 0.1; done
base=$(rss_kib)
start=$(date +%s.%N)
"$build/tools/fleet-sim/cvm-fleet-sim" --nats-url "$url" --nodes "$nodes" --register-only --shared-subscription \
  --heartbeat-ms 600000 >"$dir/sim.log" 2>&1 &
pids+=($!)
for _ in $(seq 3000); do
  n=$(gauge || true)
  [ "${n%.*}" = "$nodes" ] && break
  sleep 0.1
done
loaded=$(date +%s.%N)
full=$(rss_kib)
echo "nodes indexed: ${n:-?} of $nodes in $(echo "$loaded - $start" | bc) s"
echo "scheduler VmRSS: $((base / 1024)) MiB with no nodes (baseline), $((full / 1024)) MiB with $nodes nodes"
echo "per node: $(( (full - base) * 1024 / ${n%.*} )) bytes"
