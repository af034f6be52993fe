#!/usr/bin/env bash
# Node agent memory with N running systemd+Docker workspaces on one node, and how it grows.
# Starts its own nats-server (JetStream), the real cvm-scheduler, cvm-gpu-broker and one
# cvm-node-agent, then starts N Debian CVM workspaces (scripts/build-debian-image.sh) through
# cvmctl, two at a time. Each one must reach RUNNING, its systemd must finish booting and docker
# must be active inside. The agent's VmRSS and VmHWM are read from /proc before any workspace
# (the baseline of the same run), after 1, 5, 10, 15, 20, ... are up, and after all are deleted.
# Usage: bench/agent_rss_machines.sh BUILD_DIR [N]   (root; N defaults to 20)
# Env: IMAGE_CACHE (default /var/cache/cvm-control/images), PARALLEL (default 2).
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR [N]}
count=${2:-20}
cache=${IMAGE_CACHE:-/var/cache/cvm-control/images}
parallel=${PARALLEL:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 2; }
dir=$(mktemp -d /tmp/cvm-agent-rss.XXXXXX)
chmod 755 "$dir"
bridge=cvmrss$((RANDOM % 1000))
pids=()
made=()
url=
runc_root=$dir/runc

cleanup() {
  set +e
  trap - EXIT INT TERM
  if [ -n "$url" ]; then
    for ws in "${made[@]}"; do
      timeout 150 "$dir/bin/cvmctl" --nats-url "$url" --plain build delete --workspace "$ws" \
        --watch --timeout 120 >>"$dir/delete.log" 2>&1 || echo "delete $ws failed" >&2
    done
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  wait 2>/dev/null
  # Whatever the deletes left: containers of this run's runc root, mounts under its temp dir,
  # its bridge.
  for id in $(timeout 30 runc --root "$runc_root" list -q 2>/dev/null); do
    timeout 30 runc --root "$runc_root" delete -f "$id"
  done
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r |
    while read -r m; do umount -l "$m"; done
  ip link show "$bridge" >/dev/null 2>&1 && ip link del "$bridge"
  rm -rf --one-file-system "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. "$(dirname "$0")/lib.sh"
now() { date +%s.%N; }

# Own copies of the binaries: a rebuild of BUILD_DIR during the run must not change them. The
# agent finds cvm-supervisor and cvm-unpack next to itself.
mkdir -p "$dir/bin"
cp "$build/services/scheduler/cvm-scheduler" "$build/services/gpu-broker/cvm-gpu-broker" \
  "$build/services/node-agent/cvm-node-agent" "$build/services/node-agent/cvm-supervisor" \
  "$build/services/node-agent/cvm-unpack" "$build/cli/cvmctl/cvmctl" "$dir/bin/"

timeout 900 sh "$here/scripts/build-debian-image.sh" "$cache" debian >"$dir/image.log" 2>&1 ||
  { cat "$dir/image.log" >&2; exit 1; }
image=oci:$cache:debian

start_nats "$dir"
pids+=("$nats_pid")
"$dir/bin/cvm-scheduler" --nats-url "$url" --metrics-listen "127.0.0.1:$(free_port)" \
  >"$dir/scheduler.log" 2>&1 &
pids+=($!)
"$dir/bin/cvm-gpu-broker" --nats-url "$url" --metrics-listen off >"$dir/broker.log" 2>&1 &
pids+=($!)
"$dir/bin/cvm-node-agent" --nats-url "$url" --node-id rss-node --state-dir "$dir/agent" \
  --runc-root "$runc_root" --metrics-listen "127.0.0.1:$(free_port)" --heartbeat-interval 1 \
  --stop-grace 2 --network-bridge "$bridge" --network-subnet 10.197.0.0/16 >"$dir/agent.log" 2>&1 &
agent=$!
pids+=($agent)
registered=
for _ in $(seq 60); do
  if timeout 10 "$dir/bin/cvmctl" --nats-url "$url" nodes 2>/dev/null | grep -q rss-node; then
    registered=1
    break
  fi
  sleep 0.5
done
[ -n "$registered" ] || { echo "the agent did not register"; tail -20 "$dir/agent.log"; exit 1; }

status_kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$agent/status"; }
samples=()
sample() { # label
  sleep 2
  samples+=("$1 $(status_kib VmRSS) $(status_kib VmHWM)")
  echo "$(date +%T) $1 workspaces: agent VmRSS $(($(status_kib VmRSS) / 1024)) MiB" >&2
}

# The host pid of workspace $1's inner init: runc's pid of the supervising container cvm-<ws>,
# then its child that is PID 1 of its own PID namespace (NSpid ends in 1).
inner_pid() {
  local sup child ns
  sup=$(timeout 30 runc --root "$runc_root" state "cvm-$1" 2>/dev/null |
    sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' | head -1)
  [ -n "$sup" ] || return 1
  for child in $(cat "/proc/$sup/task/$sup/children" 2>/dev/null); do
    ns=$(awk '/^NSpid:/{print NF, $NF}' "/proc/$child/status" 2>/dev/null)
    [ "${ns%% *}" -ge 3 ] 2>/dev/null && [ "${ns##* }" = 1 ] && { echo "$child"; return 0; }
  done
  return 1
}
inside() { # ws seconds command
  local pid
  pid=$(inner_pid "$1") || { echo "no inner init of $1"; return 1; }
  timeout "$2" nsenter -t "$pid" -a /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin sh -c "$3"
}

# One workspace: submit, RUNNING, systemd booted, docker active. Writes
# "ws running_s docker_s systemd_state docker_state" to $dir/res.<ws>.
one() {
  local ws=$1 t0 t1 t2 out sys dock
  t0=$(now)
  if ! timeout 660 "$dir/bin/cvmctl" --nats-url "$url" --plain build start --workspace "$ws" \
    --image "$image" --cvm --cpu 90m --memory 512Mi --watch --timeout 600 >"$dir/start.$ws" 2>&1; then
    echo "$ws - - not-running -" >"$dir/res.$ws"
    return
  fi
  t1=$(now)
  out=$(inside "$ws" 400 'for i in $(seq 1200); do [ -S /run/systemd/private ] && break; sleep 0.25; done
    timeout 300 systemctl is-system-running --wait; systemctl is-active docker' 2>&1 || true)
  t2=$(now)
  sys=$(printf '%s\n' "$out" | sed -n 1p)
  dock=$(printf '%s\n' "$out" | sed -n 2p)
  printf '%s\n' "$out" >"$dir/check.$ws"
  echo "$ws $(echo "$t1 - $t0" | bc) $(echo "$t2 - $t0" | bc) ${sys:-none} ${dock:-none}" >"$dir/res.$ws"
}

sample 0
checkpoints=()
for c in 1 5 10 15 20 25 30 40 50; do if [ "$c" -lt "$count" ]; then checkpoints+=("$c"); fi; done
checkpoints+=("$count")
up=0
for cp in "${checkpoints[@]}"; do
  while [ "$up" -lt "$cp" ]; do
    batch=()
    while [ "$up" -lt "$cp" ] && [ "${#batch[@]}" -lt "$parallel" ]; do
      up=$((up + 1))
      made+=("rss-$up")
      batch+=("rss-$up")
    done
    jobs_=()
    for ws in "${batch[@]}"; do
      one "$ws" &
      jobs_+=($!)
    done
    for j in "${jobs_[@]}"; do wait "$j" || true; done
    for ws in "${batch[@]}"; do echo "$(date +%T) $(cat "$dir/res.$ws")" >&2; done
  done
  sample "$cp"
done

# Failures: what systemd and the console said.
failed=0
ok=0
for ws in "${made[@]}"; do
  read -r _ r d sys dock <"$dir/res.$ws"
  if [ "$sys" = running ] && [ "$dock" = active ]; then ok=$((ok + 1)); fi
  if [ "$r" = - ] || [ "$dock" != active ]; then failed=$((failed + 1)); fi
  if [ "$sys" != running ] || [ "$dock" != active ]; then
    echo "--- $ws: systemd '$sys', docker '$dock'"
    [ "$r" = - ] && tail -20 "$dir/start.$ws"
    inside "$ws" 30 'systemctl --failed --no-pager' 2>&1 | head -20 || true
    timeout 30 "$dir/bin/cvmctl" --nats-url "$url" logs "$ws" --tail 40 2>&1 || true
  fi
done

# Deleting every workspace: what the agent keeps afterwards.
for ws in "${made[@]}"; do
  timeout 150 "$dir/bin/cvmctl" --nats-url "$url" --plain build delete --workspace "$ws" --watch \
    --timeout 120 >>"$dir/delete.log" 2>&1 || echo "delete $ws failed" >&2
done
made=()
sample "0 (all deleted)"

echo
echo "node agent memory, $count systemd+Docker workspaces ($image, --cvm --cpu 90m --memory 512Mi)"
echo "| workspaces running | agent VmRSS MiB | VmHWM MiB | growth per workspace KiB |"
echo "|---|---|---|---|"
read -r _ base _ <<<"${samples[0]}"
for s in "${samples[@]}"; do
  n=${s% * *}
  rest=${s#"$n "}
  rss=${rest% *}
  hwm=${rest#* }
  per=-
  case $n in 0*) ;; *) per=$(((rss - base) / n)) ;; esac
  printf '| %s | %.1f | %.1f | %s |\n' "$n" "$(echo "$rss / 1024" | bc -l)" "$(echo "$hwm / 1024" | bc -l)" "$per"
done
stats() { # column of res files -> min/median/max
  for ws in $(seq "$count"); do awk -v c="$1" '{print $c}' "$dir/res.rss-$ws"; done | grep -v '^-$' |
    sort -g | awk '{v[NR]=$1} END {if (NR == 0) {print "none"; exit}
      m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "min %.1f s, median %.1f s, max %.1f s (n=%d)\n", v[1], m, v[NR], NR}'
}
echo
echo "submit -> RUNNING: $(stats 2)"
echo "submit -> systemd booted and docker active: $(stats 3)"
echo "first workspace: RUNNING $(awk '{print $2}' "$dir/res.rss-1") s, docker $(awk '{print $3}' "$dir/res.rss-1") s"
echo "systemd 'running' and docker 'active': $ok of $count"
for ws in $(seq "$count"); do cat "$dir/res.rss-$ws"; done | awk '{print "  " $0}'
[ "$failed" = 0 ]
