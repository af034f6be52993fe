#!/usr/bin/env bash
# The README's main job: installs what is missing, builds, starts a local NATS with JetStream, the
# scheduler, the GPU broker and one node agent, builds a workspace and shows it RUNNING.
#   scripts/demo.sh            in a terminal: keeps the stack up until Ctrl-C, then cleans up
#   scripts/demo.sh --exit     stops and cleans up right after the workspace is RUNNING
# Everything lives in one temp directory; Ctrl-C (or --exit) stops the workspace, the services and
# NATS and removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KEEP=1
[[ "${1:-}" == "--exit" || ! -t 0 ]] && KEEP=0

if [[ $(id -u) -ne 0 ]]; then
  echo "demo: run as root (containers run through runc with user namespaces)" >&2
  exit 1
fi

scripts/install-deps.sh
BUILD=build/release
if [[ ! -f $BUILD/build.ninja ]]; then cmake --preset release >/dev/null; fi
cmake --build $BUILD -j"$(nproc)" --target cvm-scheduler cvm-gpu-broker cvm-node-agent cvmctl

WORK=$(mktemp -d /tmp/cvm-demo.XXXXXX)
chmod 0755 "$WORK"
PIDS=()
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || shuf -i 20000-60000 -n 1; }
PORT=$(free_port)
URL="nats://127.0.0.1:$PORT"
CVMCTL=("$ROOT/$BUILD/cli/cvmctl/cvmctl" --nats-url "$URL")

cleanup() {
  trap - EXIT INT TERM
  echo "demo: cleaning up"
  "${CVMCTL[@]}" build delete --workspace demo --watch --timeout 30 >/dev/null 2>&1 || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  runc --root "$WORK/runc" list -q 2>/dev/null | xargs -r -n1 runc --root "$WORK/runc" delete -f || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "demo: building the default image (busybox) into $WORK/image"
scripts/build-default-image.sh "$WORK/image" latest >/dev/null

echo "demo: starting nats-server with JetStream on 127.0.0.1:$PORT"
nats-server -a 127.0.0.1 -p "$PORT" -js -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.1; done

BIN=$ROOT/$BUILD/services
"$BIN/scheduler/cvm-scheduler" --nats-url "$URL" --metrics-listen 127.0.0.1:0 >"$WORK/scheduler.log" 2>&1 &
PIDS+=($!)
"$BIN/gpu-broker/cvm-gpu-broker" --nats-url "$URL" --metrics-listen 127.0.0.1:0 >"$WORK/broker.log" 2>&1 &
PIDS+=($!)
"$BIN/node-agent/cvm-node-agent" --nats-url "$URL" --node-id demo-node --state-dir "$WORK/agent" \
  --runc-root "$WORK/runc" --metrics-listen 127.0.0.1:0 --heartbeat-interval 2 >"$WORK/agent.log" 2>&1 &
PIDS+=($!)

echo "demo: waiting for the node agent to register"
for _ in $(seq 100); do
  "${CVMCTL[@]}" nodes 2>/dev/null | grep -q demo-node && break
  sleep 0.2
done
"${CVMCTL[@]}" nodes

echo "demo: building workspace 'demo'"
if ! "${CVMCTL[@]}" build start --workspace demo --image "oci:$WORK/image:latest" --memory 256Mi --watch --timeout 120; then
  echo "demo: the build did not reach RUNNING; logs are in $WORK (kept until exit)" >&2
  tail -n 20 "$WORK"/agent.log "$WORK"/scheduler.log >&2
  exit 1
fi
pid=$(runc --root "$WORK/runc" state cvm-demo | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p')
echo "demo: container cvm-demo, init pid $pid on the host; uid_map: $(cat /proc/"$pid"/uid_map | xargs)"
if ((KEEP)); then
  echo "demo: stop it with:  ${CVMCTL[*]} build stop --workspace demo --watch"
  echo "demo: press Ctrl-C to stop everything and clean up"
  echo "demo: workspace demo is RUNNING"
  while :; do sleep 3600 & wait $!; done
fi
cleanup
echo "demo: workspace demo reached RUNNING (stack stopped and cleaned up)"
echo "RUNNING"
