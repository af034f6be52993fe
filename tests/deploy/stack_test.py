#!/usr/bin/env python3
"""The whole stack as deploy/ installs it, under Debian's Prometheus.

deploy/local/stack.sh starts NATS with deploy/nats's users and permissions (--auth), the three
services, one node agent and cvm-exporter, each with its own NATS user. Then:
  * cvmctl (as user cvmctl) builds a workspace to RUNNING with real runc, follows it, reads its
    events, lists nodes and GPUs, reads and writes settings, and sees a build fail;
  * a node is added with gen-auth.sh and NATS reloaded (SIGHUP): JetStream and its streams stay;
  * alice builds a workspace of her own and runs processes in it over her session subjects
    (exit status, stdin/stdout/stderr intact); bob may neither enter it nor read its console,
    alice may not enter cvmctl's, and cvmctl (an admin) may enter hers;
  * `promtool check metrics` is clean on every /metrics;
  * Prometheus, run with deploy/prometheus/prometheus.yml (intervals shortened to 1 s), has every
    target up, and every query of the Grafana dashboard returns a result;
  * the conditions of every alert are brought about (a node that stopped heartbeating with an
    unhealthy GPU, failing builds, a backlog behind a paused scheduler, a target down), and every
    alert expression then returns a result; `promtool check rules` passes.
GPUs cannot exist here: the lost node with a GPU is a NodeStatus written to KV cvm_nodes, as a
node agent would write it. Exit 77 (skipped) without root, runc or prometheus.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILURES = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        FAILURES.append(what)
    return ok


def wait_until(pred, timeout, poll=0.5):
    """Polls pred until it returns a truthy value or timeout seconds pass; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(poll)


def run(argv, timeout=180, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


# ---- just enough protobuf and NATS protocol to write a NodeStatus as a node agent would ----

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_varint(field, value):
    return varint(field << 3) + varint(value)


def pb_bytes(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint((field << 3) | 2) + varint(len(data)) + data


def node_status(node_id, heartbeat_ms, gpus):
    """cvm.v1.NodeStatus: node_id=1, host=2 (bare_metal=8), runtime=3 (runtime=1, ready=6),
    capacity=4 (cpu=1, memory=2), gpus=6 (GpuDevice uuid=1, name=2, healthy=7, health_reason=69),
    heartbeat_unix_ms=7."""
    msg = pb_bytes(1, node_id)
    msg += pb_bytes(2, pb_varint(8, 1))
    msg += pb_bytes(3, pb_bytes(1, "runc") + pb_varint(6, 1))
    msg += pb_bytes(4, pb_varint(1, 8000) + pb_varint(2, 16 << 30))
    for uuid, healthy in gpus:
        dev = pb_bytes(1, uuid) + pb_bytes(2, "Fake GPU") + pb_varint(7, 1 if healthy else 0)
        if not healthy:
            dev += pb_bytes(69, "XID 79 (fallen off the bus)")
        msg += pb_bytes(6, dev)
    msg += pb_varint(7, heartbeat_ms)
    return msg


def nats_publish(port, user, password, subject, payload):
    """Publishes with the plain NATS protocol; raises on -ERR (a permission violation, say)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        f.readline()  # INFO
        connect = {"user": user, "pass": password, "verbose": False, "pedantic": False}
        s.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
        s.sendall(b"PUB %s %d\r\n" % (subject.encode(), len(payload)) + payload + b"\r\nPING\r\n")
        line = f.readline()
        if not line.startswith(b"PONG"):
            raise RuntimeError(f"publish to {subject} as {user}: {line!r}")


def read_env(path):
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if "=" in line:
                k, v = line.split("=", 1)
                env[k] = v.strip('"')
    return env


class Prometheus:
    def __init__(self, work, stack_env):
        self.dir = os.path.join(work, "prometheus")
        shutil.copytree(os.path.join(ROOT, "deploy", "prometheus"), self.dir)
        conf = os.path.join(self.dir, "prometheus.yml")
        with open(conf) as f:
            config = yaml.safe_load(f)
        # The deploy file as is, but scraped and evaluated every second so the test is quick.
        config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
        with open(conf, "w") as f:
            yaml.safe_dump(config, f)
        for job, key in [("cvm-scheduler", "SCHEDULER_METRICS"), ("cvm-gpu-broker", "BROKER_METRICS"),
                         ("cvm-node-agent", "AGENT_METRICS"), ("cvm-exporter", "EXPORTER_METRICS")]:
            with open(os.path.join(self.dir, "targets", job + ".json"), "w") as f:
                json.dump([{"targets": [stack_env[key]], "labels": {}}], f)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(os.path.join(self.dir, "prometheus.log"), "w")
        self.proc = subprocess.Popen(
            ["prometheus", "--config.file=" + conf, "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
             "--web.listen-address=127.0.0.1:%d" % self.port], stdout=self.log, stderr=subprocess.STDOUT)

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def ready(self):
        try:
            return "Ready" in http_get(self.url("/-/ready"))
        except OSError:
            return False

    def query(self, expr):
        """(ok, result list, error) of an instant query."""
        try:
            body = json.loads(http_get(self.url("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))))
        except urllib.error.HTTPError as e:
            return False, [], e.read().decode()
        except OSError as e:
            return False, [], str(e)
        return body.get("status") == "success", body.get("data", {}).get("result", []), body.get("error", "")

    def targets(self):
        body = json.loads(http_get(self.url("/api/v1/targets")))
        return {t["labels"]["job"]: t["health"] for t in body["data"]["activeTargets"]}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def panel_queries():
    with open(os.path.join(ROOT, "deploy", "grafana", "cvm-dashboard.json")) as f:
        dash = json.load(f)
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def alert_rules():
    with open(os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")) as f:
        rules = yaml.safe_load(f)
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the build directory")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("runc") or not shutil.which("prometheus") or not shutil.which("promtool"):
        print("skipped: needs root, runc, prometheus and promtool")
        return 77

    work = tempfile.mkdtemp(prefix="cvm-stack-test-")
    os.chmod(work, 0o755)
    stack = os.path.join(ROOT, "deploy", "local", "stack.sh")
    prom = None
    paused = None
    try:
        image = os.path.join(work, "image")
        r = run([os.path.join(ROOT, "scripts", "build-default-image.sh"), image, "latest"])
        if not check(r.returncode == 0, "default image built"):
            print(r.stdout, r.stderr)
            return 1
        r = run([stack, "start", work, "--bin", args.bin, "--auth", "--user", "alice", "--user", "bob",
                 "--node-id", "stack-node", "--heartbeat-interval", "1"], timeout=120)
        if not check(r.returncode == 0, "stack started with per-service NATS users"):
            print(r.stdout, r.stderr)
            return 1
        env = read_env(os.path.join(work, "stack.env"))
        cvmctl = env["CVMCTL"].split() + ["--plain"]
        prom = Prometheus(work, env)
        check(wait_until(prom.ready, 30), "prometheus ready")
        # Scraped before any build, so that rates see the counters rise.
        targets = wait_until(lambda: (lambda t: t if len(t) == 4 and set(t.values()) == {"up"} else None)(prom.targets()), 30)
        check(bool(targets), "every target up: %s" % prom.targets())

        # ---- cvmctl end to end, as user cvmctl ----
        r = run(cvmctl + ["build", "start", "--workspace", "ws1", "--build-id", "stack-b1", "--image",
                          "oci:%s:latest" % image, "--memory", "64Mi", "--watch", "--timeout", "120"])
        check(r.returncode == 0 and "RUNNING" in r.stdout and "SCHEDULED" in r.stdout,
              "build start --watch reaches RUNNING through the least-privilege users\n" + r.stdout + r.stderr)
        r = run(cvmctl + ["events", "stack-b1"])
        check(r.returncode == 0 and "PREPARING" in r.stdout and "RUNNING" in r.stdout, "events shows the history")
        r = run(cvmctl + ["build", "watch", "stack-b1", "--timeout", "10"])
        check(r.returncode == 0 and "RUNNING" in r.stdout, "build watch of a finished build shows it and exits 0")
        r = run(cvmctl + ["-o", "json", "events", "stack-b1"])
        phases = [json.loads(line)["phase"] for line in r.stdout.splitlines()]
        check(r.returncode == 0 and phases[-1] == "RUNNING", "events -o json: one JSON object per event")
        r = run(cvmctl + ["events", "no-such-build"])
        check(r.returncode == 5, "events of an unknown build exits 5")
        r = run(cvmctl + ["nodes"])
        check(r.returncode == 0 and "stack-node" in r.stdout, "nodes lists the node")
        r = run(cvmctl + ["-o", "json", "nodes"])
        check(r.returncode == 0 and json.loads(r.stdout)[0]["node_id"] == "stack-node", "nodes -o json")
        r = run(cvmctl + ["settings", "set", "caching=false", "scoring=spread"])
        check(r.returncode == 0, "settings set\n" + r.stderr)
        r = run(cvmctl + ["-o", "json", "settings", "get"])
        got = json.loads(r.stdout) if r.returncode == 0 else {}
        check(got.get("stored") is True and got["settings"]["scoring"] == "SPREAD"
              and got["settings"]["cvm_enabled"] is True, "settings get -o json shows stored values and defaults")
        r = run(cvmctl + ["settings", "set", "nonsense=1"])
        check(r.returncode == 2 and "settings:" in r.stderr, "settings set of an unknown key is a usage error")
        # ---- sessions, each person on the subjects of their own NATS user ----
        def person(name):
            c = read_env(os.path.join(work, "auth", "credentials", name + ".env"))
            return cvmctl[:3] + ["--nats-user", c["CVM_NATS_USER"], "--nats-password", c["CVM_NATS_PASSWORD"],
                                 "--plain"]
        alice, bob = person("alice"), person("bob")
        r = run(alice + ["build", "start", "--workspace", "wa", "--build-id", "stack-alice", "--image",
                         "oci:%s:latest" % image, "--memory", "64Mi", "--cpu", "500m", "--watch", "--timeout", "120"])
        check(r.returncode == 0 and "RUNNING" in r.stdout, "alice builds a workspace of her own\n" + r.stdout + r.stderr)
        r = run(cvmctl + ["workspaces", "--owner", "alice"])
        check(r.returncode == 0 and "wa" in r.stdout and "ws1" not in r.stdout, "workspaces --owner alice lists hers\n"
              + r.stdout + r.stderr)
        r = run(alice + ["exec", "wa", "--", "sh", "-c", "echo uid=$(id -u); exit 3"], timeout=60)
        check(r.returncode == 3 and "uid=0" in r.stdout,
              "her exec runs as the workspace's root and its exit status is cvmctl's\n" + r.stdout + r.stderr)
        payload = "".join(chr(33 + i % 90) for i in range(300000))
        r = run(alice + ["exec", "-i", "wa", "--", "sh", "-c", "cat; echo done >&2"], input=payload, timeout=60)
        check(r.returncode == 0 and r.stdout == payload and "done" in r.stderr,
              "stdin, stdout and stderr stream through her session intact (%d of %d bytes)" % (len(r.stdout), len(payload)))
        r = run(bob + ["exec", "wa", "--", "true"], timeout=60)
        check(r.returncode != 0 and "belongs to alice, not to bob" in r.stderr,
              "bob may not enter alice's workspace\n" + r.stderr)
        r = run(bob + ["logs", "wa"], timeout=60)
        check(r.returncode != 0, "bob may not read its console\n" + r.stdout + r.stderr)
        r = run(alice + ["exec", "ws1", "--", "true"], timeout=60)
        check(r.returncode != 0 and "not to alice" in r.stderr, "alice may not enter cvmctl's workspace\n" + r.stderr)
        r = run(cvmctl + ["exec", "wa", "--", "true"], timeout=60)
        check(r.returncode == 0, "the operator user cvmctl, an admin, may enter hers\n" + r.stderr)
        r = run(alice + ["build", "delete", "--workspace", "wa", "--watch", "--timeout", "60"])
        check(r.returncode == 0 and "STOPPED" in r.stdout, "alice deletes her workspace\n" + r.stdout + r.stderr)

        # ---- a node added as docs/operations.md says: gen-auth.sh again, then a reload ----
        r = run([os.path.join(ROOT, "deploy", "nats", "gen-auth.sh"), "--out", os.path.join(work, "auth"),
                 "--user", "alice", "--user", "bob", "stack-node", "second-node"])
        check(r.returncode == 0 and os.path.exists(os.path.join(work, "auth", "credentials", "agent-second-node.env")),
              "gen-auth.sh adds a node and keeps everyone's password\n" + r.stderr)
        with open(os.path.join(work, "pids")) as f:
            nats_pid = int(f.read().split()[0])  # stack.sh starts NATS first
        os.kill(nats_pid, signal.SIGHUP)
        # Small: ws1 holds one of the node's two CPUs, and alice's half a CPU is held for a while
        # after its delete.
        r = run(cvmctl + ["build", "start", "--workspace", "ws2", "--build-id", "stack-b2", "--image",
                          "oci:%s:latest" % image, "--memory", "64Mi", "--cpu", "100m", "--watch",
                          "--timeout", "120"])
        check(r.returncode == 0 and "RUNNING" in r.stdout,
              "after the reload JetStream still runs: a build reaches RUNNING\n" + r.stdout + r.stderr)
        r = run(cvmctl + ["events", "stack-b1"])
        check(r.returncode == 0 and "RUNNING" in r.stdout, "and the streams kept what they held\n" + r.stderr)
        r = run(cvmctl + ["build", "delete", "--workspace", "ws2", "--watch", "--timeout", "60"])
        check(r.returncode == 0 and "STOPPED" in r.stdout, "ws2 deleted\n" + r.stdout + r.stderr)

        for i in range(2):
            r = run(cvmctl + ["build", "start", "--workspace", "huge%d" % i, "--image", "oci:%s:latest" % image,
                              "--memory", "100Ti", "--watch", "--timeout", "60"])
            check(r.returncode == 1 and "NO_ELIGIBLE_NODE" in r.stdout, "a build that fits no node exits 1")

        # ---- /metrics of every process ----
        for key in ["SCHEDULER_METRICS", "BROKER_METRICS", "AGENT_METRICS", "EXPORTER_METRICS"]:
            text = http_get("http://%s/metrics" % env[key])
            r = run(["promtool", "check", "metrics"], input=text)
            check(r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(),
                  "promtool check metrics clean on %s\n%s%s" % (key, r.stdout, r.stderr))

        # ---- Prometheus: dashboard ----
        gpu_creds = read_env(os.path.join(work, "auth", "credentials", "scheduler.env"))
        now_ms = int(time.time() * 1000)
        # A node that stopped heartbeating ten minutes ago, with one healthy and one failed GPU.
        nats_publish(int(env["NATS_PORT"]), gpu_creds["CVM_NATS_USER"], gpu_creds["CVM_NATS_PASSWORD"],
                     "$KV.cvm_nodes.ghost-gpu-node",
                     node_status("ghost-gpu-node", now_ms - 600_000, [("GPU-ok", True), ("GPU-bad", False)]))
        for title, expr in panel_queries():
            result = wait_until(lambda: (lambda q: q if q[0] and q[1] else None)(prom.query(expr)), 30)
            check(bool(result), "dashboard panel '%s' returns a result: %s %s" % (title, expr, prom.query(expr)[2]))

        # ---- alerts: bring each condition about ----
        agent_creds = read_env(os.path.join(work, "auth", "credentials", "agent-stack-node.env"))
        try:
            nats_publish(int(env["NATS_PORT"]), agent_creds["CVM_NATS_USER"], agent_creds["CVM_NATS_PASSWORD"],
                         "$KV.cvm_nodes.ghost-gpu-node", b"forged")
            check(False, "an agent's user must not write another node's status")
        except RuntimeError:
            check(True, "an agent's user cannot write another node's status")
        # Conditions that hold now: a lost node with an unhealthy GPU, failing builds. Checked
        # before the scheduler is paused, which makes its series stale.
        needs_pause = {"CvmQueueBacklog", "CvmTargetDown"}
        for name, expr in alert_rules():
            if name in needs_pause:
                continue
            result = wait_until(lambda: (lambda q: q if q[0] and q[1] else None)(prom.query(expr)), 60)
            check(bool(result), "alert %s: its expression returns a result once its condition holds: %s"
                  % (name, " ".join(expr.split())))
        # A backlog behind a paused scheduler, which is also a target down.
        with open(os.path.join(work, "pids")) as f:
            pids = f.read().split()
        scheduler_pid = int(pids[1])  # stack.sh starts NATS, then the scheduler
        os.kill(scheduler_pid, signal.SIGSTOP)
        paused = scheduler_pid
        ctl_user = cvmctl[cvmctl.index("--nats-user") + 1]
        ctl_password = cvmctl[cvmctl.index("--nats-password") + 1]
        # 40: the paused scheduler's last pull request (a batch of 16, waiting up to 500 ms) may
        # still take some; more than 20 stay pending whatever it took.
        for i in range(40):
            nats_publish(int(env["NATS_PORT"]), ctl_user, ctl_password, "cvm.v1.builds.submit", b"\x0a\x01x")
        for name, expr in alert_rules():
            if name not in needs_pause:
                continue
            result = wait_until(lambda: (lambda q: q if q[0] and q[1] else None)(prom.query(expr)), 60)
            check(bool(result), "alert %s: its expression returns a result once its condition holds: %s"
                  % (name, " ".join(expr.split())))
        os.kill(scheduler_pid, signal.SIGCONT)
        paused = None
        r = run(["promtool", "check", "rules", os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")])
        check(r.returncode == 0, "promtool check rules\n" + r.stdout + r.stderr)

        r = run(cvmctl + ["build", "delete", "--workspace", "ws1", "--watch", "--timeout", "60"])
        check(r.returncode == 0 and "STOPPED" in r.stdout, "build delete --watch\n" + r.stdout + r.stderr)
    finally:
        if paused:
            os.kill(paused, signal.SIGCONT)
        if prom:
            prom.stop()
        run([stack, "stop", work], timeout=60)
        if FAILURES:
            print("kept %s for the logs" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("%d failure(s)" % len(FAILURES))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
