#!/usr/bin/env bash
# The README's main job: installs what is missing, builds, starts the local stack (deploy/local/
# stack.sh: NATS with JetStream, the scheduler, the GPU broker, one node agent and the exporter),
# builds a workspace and shows it RUNNING.
#   scripts/demo.sh            in a terminal: keeps the stack up until Ctrl-C, then cleans up
#   scripts/demo.sh --exit     stops and cleans up right after the workspace is RUNNING
#   scripts/demo.sh --image debian [--exit]
#                              the workspace is a Debian machine (scripts/build-debian-image.sh,
#                              cached): systemd boots, and `docker run` is shown working inside
# Everything lives in one temp directory; Ctrl-C (or --exit) stops the workspace, the services and
# NATS and removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=1
IMAGE=busybox
[[ ! -t 0 ]] && KEEP=0
while (($#)); do
  case $1 in
    --exit) KEEP=0 ;;
    --image) IMAGE=${2:?--image busybox|debian}; shift ;;
    *) echo "usage: $0 [--exit] [--image busybox|debian]" >&2; exit 2 ;;
  esac
  shift
done
[[ $IMAGE == busybox || $IMAGE == debian ]] || { echo "demo: --image busybox|debian" >&2; exit 2; }

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

if [[ $IMAGE == debian ]]; then
  # Cached by its recipe: a minute the first time, nothing after.
  CACHE=/var/cache/cvm-control/images
  echo "demo: building the Debian image (mmdebstrap + umoci) into $CACHE"
  mkdir -p "$CACHE"
  scripts/build-debian-image.sh "$CACHE" debian >/dev/null
  IMAGE_REF="oci:$CACHE:debian"
  MEMORY=1Gi
else
  echo "demo: building the default image (busybox) into $WORK/image"
  scripts/build-default-image.sh "$WORK/image" latest >/dev/null
  IMAGE_REF="oci:$WORK/image:latest"
  MEMORY=256Mi
fi

echo "demo: starting the local stack (deploy/local/stack.sh): NATS, scheduler, GPU broker, node agent, exporter"
STARTED=1
deploy/local/stack.sh start "$WORK" --bin "$BUILD" --node-id demo-node
# shellcheck disable=SC1091
source "$WORK/stack.env"
read -r -a CVMCTL <<<"$CVMCTL"
"${CVMCTL[@]}" nodes

echo "demo: building workspace 'demo'"
if ! "${CVMCTL[@]}" build start --workspace demo --image "$IMAGE_REF" --memory "$MEMORY" --watch --timeout 120; then
  echo "demo: the build did not reach RUNNING; the logs follow" >&2
  tail -n 20 "$WORK"/agent.log "$WORK"/scheduler.log >&2
  exit 1
fi
sup=$(runc --root "$RUNC_ROOT" state cvm-demo | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p')
# cvm-demo is the supervising container; the workspace is its descendant that is PID 1 of its own
# PID namespace (the inner container), so that is the uid_map worth showing.
descendants() {
  ps -e -o pid=,ppid= | awk -v root="$1" '{ parent[$1] = $2 }
    END { for (p in parent) { q = p; while ((q in parent) && q != root && q > 1) q = parent[q];
                              if (q == root && p != root) print p } }'
}
inner=""
for p in $(descendants "$sup"); do
  ns=$(awk '/^NSpid:/ {print $NF}' /proc/"$p"/status 2>/dev/null)
  if [[ $ns == 1 ]]; then inner=$p; break; fi
done
echo "demo: supervising container cvm-demo (pid $sup), uid_map: $(xargs < /proc/"$sup"/uid_map)"
if [[ -n $inner ]]; then
  echo "demo: workspace init pid $inner on the host, uid_map: $(xargs < /proc/"$inner"/uid_map)"
fi
if [[ $IMAGE == debian && -n $inner ]]; then
  in_ws() { nsenter -t "$inner" -a /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root /bin/sh -c "$1"; }
  echo "demo: inside the workspace: systemd $(in_ws 'timeout 90 systemctl is-system-running --wait' || true)"
  in_ws 'ip -4 -br addr show dev eth0' | sed 's/^/demo: inside the workspace: /' || true
  echo "demo: inside the workspace: docker info: storage driver $(in_ws "docker info --format '{{.Driver}}'")"
  # An image from a tarball of the node's busybox (no registry needed).
  tmp=$(mktemp -d); mkdir -p "$tmp/root/bin"; cp /bin/busybox "$tmp/root/bin/"
  ln -s busybox "$tmp/root/bin/sh"; ln -s busybox "$tmp/root/bin/echo"
  tar -C "$tmp/root" -cf "/proc/$inner/root/root/bb.tar" .; rm -rf "$tmp"
  in_ws 'docker import /root/bb.tar demo-bb >/dev/null'
  echo "demo: inside the workspace: docker run says: $(in_ws 'docker run --rm demo-bb echo hello from docker run')"
fi
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
