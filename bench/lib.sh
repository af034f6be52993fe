# Shared by the bench scripts (sourced): a free loopback port, and a nats-server with JetStream
# on one, its store in a given directory.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_nats DIR: starts nats-server -js on a free loopback port (store DIR/js, log DIR/nats.log),
# waits up to 10 s for it to accept, and sets nats_port, nats_pid and url.
start_nats() {
  local dir=$1
  nats_port=$(free_port)
  nats-server -js -sd "$dir/js" -a 127.0.0.1 -p "$nats_port" >"$dir/nats.log" 2>&1 &
  nats_pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$nats_port") 2>/dev/null && break; sleep 0.1; done
  url=nats://127.0.0.1:$nats_port
}
