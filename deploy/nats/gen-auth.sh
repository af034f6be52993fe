#!/usr/bin/env bash
# Writes the NATS authorization of cvm-control: one account (CVM, JetStream enabled) with one user
# per service and one user per node agent, each allowed only the subjects it uses. No anonymous
# access: a server with users refuses clients without credentials.
#
#   deploy/nats/gen-auth.sh --out DIR [--tls-cert F --tls-key F [--tls-ca F]] [--user NAME]...
#                           NODE_ID...
#
# DIR gets:
#   auth.conf          the accounts block, included by cluster.conf (mode 0600: it holds passwords)
#   tls.conf           a tls block when --tls-* is given, else only a comment (cluster.conf includes it)
#   credentials/*.env  CVM_NATS_USER / CVM_NATS_PASSWORD per service, per node agent and per
#                      --user, for systemd EnvironmentFile= or a Kubernetes Secret (all read these)
#
# --user NAME adds a person: cvmctl's permissions, with sessions (exec, shell) as NAME only. The
# name is a subject token of the session subjects (cvm.v1.node.<node>.open.<NAME>, ...), and only
# NAME may publish it, so an agent knows who asks; it lets NAME into workspaces NAME owns. The
# operator user "cvmctl" has sessions as "cvmctl", which agents count as an admin by default
# (--session-admins).
# Existing passwords in DIR/credentials are kept, so adding a node does not rotate everyone.
#
# Why subjects look the way they do (cnats 3.4.1 against nats-server 2.9, see docs/operations.md):
# every client's replies arrive on _INBOX_<user>.> (the bus adapter derives that prefix from the
# user), JetStream calls are requests to $JS.API.*, KV writes are publishes to $KV.<bucket>.<key>,
# KV reads are $JS.API.DIRECT.GET.KV_<bucket>.>, KV watches/keys are ordered consumers
# ($JS.API.CONSUMER.CREATE.KV_<bucket>, flow control on $JS.FC.>), and a named durable is created
# on $JS.API.CONSUMER.CREATE.<stream>.<durable>.<filter>, which pins a node agent to its own work.
set -euo pipefail

OUT=""
TLS_CERT=""
TLS_KEY=""
TLS_CA=""
NODES=()
PEOPLE=()
while (($#)); do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --tls-cert) TLS_CERT=$2; shift 2 ;;
    --tls-key) TLS_KEY=$2; shift 2 ;;
    --tls-ca) TLS_CA=$2; shift 2 ;;
    --user) PEOPLE+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) echo "gen-auth: unknown option $1" >&2; exit 2 ;;
    *) NODES+=("$1"); shift ;;
  esac
done
[[ -n $OUT ]] || { echo "gen-auth: --out DIR is required" >&2; exit 2; }
if [[ -n $TLS_CERT || -n $TLS_KEY ]] && [[ -z $TLS_CERT || -z $TLS_KEY ]]; then
  echo "gen-auth: --tls-cert and --tls-key go together" >&2; exit 2
fi
for n in "${NODES[@]}"; do
  # Node ids travel in subjects and consumer names: the same rule the services apply.
  [[ $n =~ ^[A-Za-z0-9_-]{1,128}$ ]] || { echo "gen-auth: bad node id '$n' ([A-Za-z0-9_-])" >&2; exit 2; }
done

for u in "${PEOPLE[@]}"; do
  [[ $u =~ ^[A-Za-z0-9_-]{1,128}$ ]] || { echo "gen-auth: bad user name '$u' ([A-Za-z0-9_-])" >&2; exit 2; }
  case $u in
    scheduler|gpu-broker|exporter|cvmctl|agent-*) echo "gen-auth: '$u' is a service's user" >&2; exit 2 ;;
  esac
done

mkdir -p "$OUT/credentials"
chmod 0700 "$OUT/credentials"

password_for() {  # user -> password, kept across runs
  local f="$OUT/credentials/$1.env"
  if [[ -f $f ]]; then
    sed -n 's/^CVM_NATS_PASSWORD=//p' "$f"
  else
    local p
    p=$(head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 32)
    umask 077
    printf 'CVM_NATS_USER=%s\nCVM_NATS_PASSWORD=%s\n' "$1" "$p" >"$f"
    echo "$p"
  fi
}

STREAMS=(CVM_BUILDS CVM_NODE_WORK CVM_EVENTS)
BUCKETS=(cvm_nodes cvm_settings cvm_workspaces cvm_gpu_leases cvm_capacity cvm_placements)

list() { local IFS=,; echo "$*"; }
q() { printf '"%s"' "$1"; }

# What a client needs to create or bind a KV bucket, read it, and watch/list it.
kv_read() {
  local b=$1
  q "\$JS.API.STREAM.CREATE.KV_$b"; echo -n ", "
  q "\$JS.API.STREAM.INFO.KV_$b"; echo -n ", "
  q "\$JS.API.DIRECT.GET.KV_$b.>"; echo -n ", "
  q "\$JS.API.STREAM.MSG.GET.KV_$b"; echo -n ", "
  q "\$JS.API.CONSUMER.CREATE.KV_$b"; echo -n ", "
  q "\$JS.API.CONSUMER.CREATE.KV_$b.>"; echo -n ", "
  q "\$JS.API.CONSUMER.DELETE.KV_$b.*"; echo -n ", "
  q "\$JS.API.CONSUMER.INFO.KV_$b.*"; echo -n ", "
  q "\$JS.FC.KV_$b.>"
}
kv_write() { q "\$KV.$1.>"; }
# Ordered reads of a stream (cvmctl's watch, the exporter): ephemeral consumers only.
stream_read() {
  local s=$1
  q "\$JS.API.STREAM.INFO.$s"; echo -n ", "
  q "\$JS.API.STREAM.MSG.GET.$s"; echo -n ", "
  q "\$JS.API.CONSUMER.CREATE.$s"; echo -n ", "
  q "\$JS.API.CONSUMER.CREATE.$s.>"; echo -n ", "
  q "\$JS.API.CONSUMER.DELETE.$s.*"; echo -n ", "
  q "\$JS.API.CONSUMER.LIST.$s"; echo -n ", "
  q "\$JS.API.CONSUMER.NAMES.$s"; echo -n ", "
  q "\$JS.FC.$s.>"
}
stream_own() {  # create (never delete or purge) a stream of the wire contract
  q "\$JS.API.STREAM.CREATE.$1"; echo -n ", "
  q "\$JS.API.STREAM.UPDATE.$1"; echo -n ", "
  q "\$JS.API.STREAM.INFO.$1"
}
COMMON='"$JS.API.INFO", "$JS.API.STREAM.NAMES"'

all_kv_read() { local b; for b in "${BUCKETS[@]}"; do kv_read "$b"; echo -n ", "; done; }
all_kv_write() { local b; for b in "${BUCKETS[@]}"; do kv_write "$b"; echo -n ", "; done; }

scheduler_pub() {
  echo -n "$COMMON, "
  for s in "${STREAMS[@]}"; do stream_own "$s"; echo -n ", "; done
  # The dead-letter stream of CVM_BUILDS' advisories, made at scheduler start (the server fills it).
  stream_own CVM_DEAD_LETTERS; echo -n ", "
  all_kv_read; all_kv_write
  # Its durable pull consumer on CVM_BUILDS: made, fetched from, acknowledged.
  q '$JS.API.CONSUMER.CREATE.CVM_BUILDS.scheduler.>'; echo -n ", "
  q '$JS.API.CONSUMER.CREATE.CVM_BUILDS.scheduler'; echo -n ", "
  q '$JS.API.CONSUMER.DURABLE.CREATE.CVM_BUILDS.scheduler'; echo -n ", "
  q '$JS.API.CONSUMER.INFO.CVM_BUILDS.scheduler'; echo -n ", "
  q '$JS.API.CONSUMER.MSG.NEXT.CVM_BUILDS.scheduler'; echo -n ", "
  q '$JS.ACK.CVM_BUILDS.scheduler.>'; echo -n ", "
  q '$JS.API.STREAM.MSG.GET.CVM_EVENTS'; echo -n ", "
  q '$JS.API.DIRECT.GET.CVM_EVENTS.>'; echo -n ", "
  q 'cvm.v1.node.*.work'; echo -n ", "
  q 'cvm.v1.builds.*.events'; echo -n ", "
  q 'cvm.v1.gpu.reserve'; echo -n ", "
  q 'cvm.v1.gpu.release'
}

broker_pub() {
  echo -n "$COMMON, "
  stream_own CVM_EVENTS; echo -n ", "
  all_kv_read; all_kv_write
  q 'cvm.v1.builds.*.events'
}

# The backlog of each consumer of a stream, and nothing else of it: no message, no consumer of
# its own to read them with, and no CONSUMER.DELETE (which would stop the scheduler's durable).
consumer_backlogs() {
  q "\$JS.API.STREAM.INFO.$1"; echo -n ", "
  q "\$JS.API.CONSUMER.LIST.$1"
}

exporter_pub() {
  echo -n "$COMMON, "
  kv_read cvm_nodes; echo -n ", "
  kv_read cvm_gpu_leases; echo -n ", "
  consumer_backlogs CVM_BUILDS; echo -n ", "
  consumer_backlogs CVM_NODE_WORK
}

cvmctl_pub() {
  echo -n "$COMMON, "
  kv_read cvm_nodes; echo -n ", "
  kv_read cvm_gpu_leases; echo -n ", "
  kv_read cvm_settings; echo -n ", "
  q '$KV.cvm_settings.infrastructure'; echo -n ", "
  stream_read CVM_EVENTS; echo -n ", "
  q '$JS.API.STREAM.INFO.CVM_BUILDS'; echo -n ", "
  q '$JS.API.CONSUMER.LIST.CVM_BUILDS'; echo -n ", "
  # dead-letters: the advisories by sequence, and the given-up request while CVM_BUILDS holds it.
  q '$JS.API.STREAM.INFO.CVM_DEAD_LETTERS'; echo -n ", "
  q '$JS.API.STREAM.MSG.GET.CVM_DEAD_LETTERS'; echo -n ", "
  q '$JS.API.STREAM.MSG.GET.CVM_BUILDS'; echo -n ", "
  # logs: where a workspace lives (the request to its node's agent is a session_pub subject).
  kv_read cvm_workspaces; echo -n ", "
  q 'cvm.v1.builds.submit'
}

# Sessions and console requests as `name` only: open on any node, input to its own sessions, a
# workspace's console (`cvmctl logs`).
session_pub() {
  q "cvm.v1.node.*.open.$1"; echo -n ", "; q "cvm.v1.node.*.session.$1.*.in"; echo -n ", "
  q "cvm.v1.node.*.console.$1"
}
session_sub() { q "_INBOX_$1.>"; echo -n ", "; q "cvm.v1.node.*.session.$1.*.out"; }

agent_pub() {
  local n=$1
  echo -n "$COMMON, "
  # The streams it uses, made by the scheduler (an agent that starts first retries until they are
  # there): never created by an agent, which could otherwise give one any retention.
  q '$JS.API.STREAM.INFO.CVM_NODE_WORK'; echo -n ", "
  q '$JS.API.STREAM.INFO.CVM_EVENTS'; echo -n ", "
  kv_read cvm_nodes; echo -n ", "
  kv_read cvm_workspaces; echo -n ", "
  # Its own work only: the durable's name and its filter are both in the subject.
  q "\$JS.API.CONSUMER.CREATE.CVM_NODE_WORK.agent-$n.cvm.v1.node.$n.work"; echo -n ", "
  q "\$JS.API.CONSUMER.INFO.CVM_NODE_WORK.agent-$n"; echo -n ", "
  q "\$JS.API.CONSUMER.MSG.NEXT.CVM_NODE_WORK.agent-$n"; echo -n ", "
  q "\$JS.ACK.CVM_NODE_WORK.agent-$n.>"; echo -n ", "
  # Its own status only; workspace records are keyed by workspace, not node.
  q "\$KV.cvm_nodes.$n"; echo -n ", "
  kv_write cvm_workspaces; echo -n ", "
  q 'cvm.v1.builds.*.events'; echo -n ", "
  # Output of the sessions in its own node's workspaces.
  q "cvm.v1.node.$n.session.*.*.out"; echo -n ", "
  # Its own node's GPU leases only (the broker checks each lease against the node token).
  q "cvm.v1.gpu.release.$n"
}

user() {  # name pub-list sub-list [extra]
  local name=$1 pub=$2 sub=$3 extra=${4:-}
  local pw
  pw=$(password_for "$name")
  cat <<EOF
      {
        user: "$name"
        password: "$pw"
        permissions: {
          publish: { allow: [ $pub ] }
          subscribe: { allow: [ $sub ] }$extra
        }
      }
EOF
}

TMP=$(mktemp "$OUT/auth.conf.XXXXXX")
{
  echo "# Generated by deploy/nats/gen-auth.sh for nodes: ${NODES[*]:-(none)}. Do not edit: re-run it."
  echo "accounts {"
  echo "  CVM {"
  echo "    jetstream: enabled"
  echo "    users: ["
  user scheduler "$(scheduler_pub)" '"_INBOX_scheduler.>"'
  # The broker answers requests: allow_responses lets it publish to each requester's reply
  # subject once, and nowhere else in other users' inboxes.
  user gpu-broker "$(broker_pub)" '"_INBOX_gpu-broker.>", "cvm.v1.gpu.reserve", "cvm.v1.gpu.release", "cvm.v1.gpu.release.*"' \
    $'\n          allow_responses: { max: 1, expires: "1m" }'
  user exporter "$(exporter_pub)" '"_INBOX_exporter.>"'
  user cvmctl "$(cvmctl_pub), $(session_pub cvmctl)" "$(session_sub cvmctl)"
  for u in "${PEOPLE[@]}"; do
    user "$u" "$(cvmctl_pub), $(session_pub "$u")" "$(session_sub "$u")"
  done
  # An agent answers console and session requests for its own node only (allow_responses, as
  # the broker), and reads the input of its own node's sessions.
  for n in "${NODES[@]}"; do
    user "agent-$n" "$(agent_pub "$n")" \
      "\"_INBOX_agent-$n.>\", \"cvm.v1.node.$n.console.*\", \"cvm.v1.node.$n.open.*\", \"cvm.v1.node.$n.session.*.*.in\"" \
      $'\n          allow_responses: { max: 1, expires: "1m" }'
  done
  echo "    ]"
  echo "  }"
  echo "}"
} >"$TMP"
chmod 0600 "$TMP"
mv "$TMP" "$OUT/auth.conf"

{
  if [[ -n $TLS_CERT ]]; then
    echo "# Generated by gen-auth.sh: clients must use TLS (nats+tls:// or tls:// URLs)."
    echo "tls {"
    echo "  cert_file: \"$TLS_CERT\""
    echo "  key_file: \"$TLS_KEY\""
    [[ -n $TLS_CA ]] && echo "  ca_file: \"$TLS_CA\""
    echo "  timeout: 2"
    echo "}"
  else
    echo "# Generated by gen-auth.sh without --tls-cert: plain TCP. Re-run with --tls-* to require TLS."
  fi
} >"$OUT/tls.conf"
echo "gen-auth: wrote $OUT/auth.conf ($((4 + ${#PEOPLE[@]} + ${#NODES[@]})) users), $OUT/tls.conf, credentials in $OUT/credentials/"
