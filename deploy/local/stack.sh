#!/usr/bin/env bash
# The local stack: nats-server with JetStream, cvm-scheduler, cvm-gpu-broker, one cvm-node-agent
# and cvm-exporter, all on free loopback ports, everything under one directory.
#
#   deploy/local/stack.sh start DIR [--bin BUILD_DIR] [--node-id ID] [--auth [--user NAME]...]
#                              [--heartbeat-interval S]
#   deploy/local/stack.sh stop DIR
#
# start returns once the node agent has registered, and writes DIR/stack.env (NATS_URL,
# *_METRICS host:port of each service, CVMCTL: a cvmctl command line with URL and credentials).
# --auth runs NATS with deploy/nats's users and permissions (gen-auth.sh) and gives every process
# its own user, as a production install does; each --user NAME adds a person (gen-auth.sh --user),
# whose credentials are DIR/auth/credentials/NAME.env. stop ends the processes (SIGTERM, then
# SIGKILL), removes the workspace containers the agent left under DIR/runc, and keeps DIR (logs are
# there).
# Used by scripts/demo.sh and by the tests under tests/deploy.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

usage() { sed -n '2,16p' "$0" >&2; exit 2; }
(($# >= 2)) || usage
CMD=$1
DIR=$2
shift 2

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits (bounded) until a TCP port accepts connections.
wait_port() {
  local port=$1 tries=${2:-100}
  for _ in $(seq "$tries"); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

stop_stack() {
  [[ -f $DIR/pids ]] || return 0
  local pids
  pids=$(cat "$DIR/pids")
  # Services first, NATS last (it is the first line), so nobody logs a lost connection in vain.
  for pid in $(echo "$pids" | tac); do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
  if [[ -d $DIR/runc ]] && command -v runc >/dev/null; then
    runc --root "$DIR/runc" list -q 2>/dev/null | xargs -r -n1 runc --root "$DIR/runc" delete -f || true
  fi
  rm -f "$DIR/pids"
}

case "$CMD" in
  stop) stop_stack; exit 0 ;;
  start) ;;
  *) usage ;;
esac

BIN=$ROOT/build/release
NODE_ID=demo-node
AUTH=0
PEOPLE=()
HEARTBEAT=2
while (($#)); do
  case "$1" in
    --bin) BIN=$(cd "$2" && pwd); shift 2 ;;
    --node-id) NODE_ID=$2; shift 2 ;;
    --auth) AUTH=1; shift ;;
    --user) PEOPLE+=(--user "$2"); shift 2 ;;
    --heartbeat-interval) HEARTBEAT=$2; shift 2 ;;
    *) usage ;;
  esac
done
for b in services/scheduler/cvm-scheduler services/gpu-broker/cvm-gpu-broker \
  services/node-agent/cvm-node-agent cli/cvmctl/cvmctl services/exporter/cvm-exporter; do
  [[ -x $BIN/$b ]] || { echo "stack: $BIN/$b is missing: build it first (cmake --build $BIN)" >&2; exit 1; }
done
mkdir -p "$DIR"
chmod 0755 "$DIR"
[[ -f $DIR/pids ]] && stop_stack
: >"$DIR/pids"

NATS_PORT=$(free_port)
NATS_URL="nats://127.0.0.1:$NATS_PORT"
NATS_ARGS=(-a 127.0.0.1 -p "$NATS_PORT")
creds() { :; }  # no users: every process connects anonymously
if ((AUTH == 0)); then
  NATS_ARGS+=(-js -sd "$DIR/nats")
else
  "$HERE/../nats/gen-auth.sh" --out "$DIR/auth" "${PEOPLE[@]}" "$NODE_ID" >/dev/null
  # The production file's auth.conf and tls.conf, on a single server (no cluster block). JetStream
  # is in the file too, not only a flag: a reload (SIGHUP, after gen-auth.sh added a node) takes
  # the file as the whole truth and would turn it off.
  printf 'include ./auth.conf\ninclude ./tls.conf\njetstream { store_dir: "%s" }\n' "$DIR/nats" \
    >"$DIR/auth/server.conf"
  NATS_ARGS+=(-c "$DIR/auth/server.conf")
  creds() {  # user -> its CVM_NATS_USER/CVM_NATS_PASSWORD as flags
    # shellcheck disable=SC1090
    (source "$DIR/auth/credentials/$1.env" && echo "--nats-user $CVM_NATS_USER --nats-password $CVM_NATS_PASSWORD")
  }
fi
nats-server "${NATS_ARGS[@]}" >"$DIR/nats.log" 2>&1 &
echo $! >>"$DIR/pids"
wait_port "$NATS_PORT" || { echo "stack: nats-server did not start; see $DIR/nats.log" >&2; exit 1; }

SCHEDULER_PORT=$(free_port)
BROKER_PORT=$(free_port)
AGENT_PORT=$(free_port)
EXPORTER_PORT=$(free_port)
start() {  # log-name user binary args...
  local log=$1 user=$2 bin=$3
  shift 3
  # shellcheck disable=SC2046
  "$bin" --nats-url "$NATS_URL" $(creds "$user") "$@" >"$DIR/$log.log" 2>&1 &
  echo $! >>"$DIR/pids"
}
start scheduler scheduler "$BIN/services/scheduler/cvm-scheduler" \
  --metrics-listen "127.0.0.1:$SCHEDULER_PORT"
start broker gpu-broker "$BIN/services/gpu-broker/cvm-gpu-broker" \
  --metrics-listen "127.0.0.1:$BROKER_PORT"
start agent "agent-$NODE_ID" "$BIN/services/node-agent/cvm-node-agent" --node-id "$NODE_ID" \
  --state-dir "$DIR/agent" --runc-root "$DIR/runc" --metrics-listen "127.0.0.1:$AGENT_PORT" \
  --heartbeat-interval "$HEARTBEAT"
start exporter exporter "$BIN/services/exporter/cvm-exporter" --metrics-listen "127.0.0.1:$EXPORTER_PORT" \
  --interval 1

CVMCTL="$BIN/cli/cvmctl/cvmctl --nats-url $NATS_URL $(creds cvmctl)"
cat >"$DIR/stack.env" <<ENV
NATS_URL=$NATS_URL
NATS_PORT=$NATS_PORT
NODE_ID=$NODE_ID
SCHEDULER_METRICS=127.0.0.1:$SCHEDULER_PORT
BROKER_METRICS=127.0.0.1:$BROKER_PORT
AGENT_METRICS=127.0.0.1:$AGENT_PORT
EXPORTER_METRICS=127.0.0.1:$EXPORTER_PORT
RUNC_ROOT=$DIR/runc
CVMCTL="$CVMCTL"
ENV

for _ in $(seq 150); do
  $CVMCTL nodes 2>/dev/null | grep -q "^$NODE_ID " && exit 0
  sleep 0.2
done
echo "stack: node agent $NODE_ID did not register within 30s; logs in $DIR" >&2
tail -n 5 "$DIR"/*.log >&2
exit 1
