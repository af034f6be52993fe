#!/usr/bin/env bash
# The README's main job: installs what is missing, builds, starts the local stack (deploy/local/
# stack.sh: NATS with JetStream, the scheduler, the GPU broker, one node agent and the exporter),
# builds a workspace and shows it RUNNING.
#   scripts/demo.sh            in a terminal: keeps the stack up until Ctrl-C, then cleans up
#   scripts/demo.sh --exit     stops and cleans up right after the workspace is RUNNING
# Everything lives in one temp directory; Ctrl-C (or --exit) stops the workspace, the services and
# NATS and removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=1
[[ "${1:-}" == "--exit" || ! -t 0 ]] && KEEP=0

if [[ $(id -u) -ne 0 ]]; then
  echo "demo: run as root (containers run through runc with user namespaces)" >&2
  exit 1
fi

scripts/install-deps.sh
BUILD=build/release
if [[ ! -f $BUILD/build.ninja ]]; then cmake --preset release >/dev/null; fi
cmake --build $BUILD -j"$(nproc)" --target cvm-scheduler cvm-gpu-broker cvm-node-agent cvmctl cvm-exporter

WORK=$(mktemp -d /tmp/cvm-demo.XXXXXX)
chmod 0755 "$WORK"
STARTED=0
CVMCTL=()

cleanup() {
  trap - EXIT INT TERM
  echo "demo: cleaning up"
  if ((STARTED)); then
    "${CVMCTL[@]}" --plain build delete --workspace demo --watch --timeout 30 >/dev/null 2>&1 || true
    deploy/local/stack.sh stop "$WORK" || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "demo: building the default image (busybox) into $WORK/image"
scripts/build-default-image.sh "$WORK/image" latest >/dev/null

echo "demo: starting the local stack (deploy/local/stack.sh): NATS, scheduler, GPU broker, node agent, exporter"
STARTED=1
deploy/local/stack.sh start "$WORK" --bin "$BUILD" --node-id demo-node
# shellcheck disable=SC1091
source "$WORK/stack.env"
read -r -a CVMCTL <<<"$CVMCTL"
"${CVMCTL[@]}" nodes

echo "demo: building workspace 'demo'"
if ! "${CVMCTL[@]}" build start --workspace demo --image "oci:$WORK/image:latest" --memory 256Mi --watch --timeout 120; then
  echo "demo: the build did not reach RUNNING; the logs follow" >&2
  tail -n 20 "$WORK"/agent.log "$WORK"/scheduler.log >&2
  exit 1
fi
pid=$(runc --root "$RUNC_ROOT" state cvm-demo | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p')
echo "demo: container cvm-demo, init pid $pid on the host; uid_map: $(cat /proc/"$pid"/uid_map | xargs)"
if ((KEEP)); then
  echo "demo: metrics: scheduler $SCHEDULER_METRICS, broker $BROKER_METRICS, agent $AGENT_METRICS, exporter $EXPORTER_METRICS"
  echo "demo: try:  ${CVMCTL[*]} gpus | settings get | events BUILD_ID"
  echo "demo: stop it with:  ${CVMCTL[*]} build stop --workspace demo --watch"
  echo "demo: press Ctrl-C to stop everything and clean up"
  echo "demo: workspace demo is RUNNING"
  while :; do sleep 3600 & wait $!; done
fi
cleanup
echo "demo: workspace demo reached RUNNING (stack stopped and cleaned up)"
echo "RUNNING"
