#!/usr/bin/env python3
"""Turns the logs of scripts/bench.sh into the markdown results table.

  results_table.py LOG_DIR SECONDS QUICK LOADAVG_BEFORE

Every figure is read by its printed label; a missing log or label gives "n/a" (other work may
change a program's output; the table must still come out).
"""
import datetime
import json
import os
import platform
import re
import sys

log_dir, seconds, quick, load_before = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]


def read(name):
    try:
        with open(os.path.join(log_dir, name + ".log"), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def num(text, pattern):
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else None


def pct(text, label):
    """(p50, p99) in microseconds from a 'LABEL  p50 X us ... p99 Y us' line."""
    m = re.search(r"^" + re.escape(label) + r"\s+p50\s+([\d.]+) us.*?p99\s+([\d.]+) us", text, re.M)
    return (float(m.group(1)), float(m.group(2))) if m else (None, None)


def gbench(text):
    """Google Benchmark JSON (possibly interleaved with log lines) -> {name: benchmark}."""
    # In-process services log to stdout too (spdlog): drop their lines before decoding.
    text = re.sub(r"^\[\d{4}-\d\d-\d\d [^\n]*\n", "", text, flags=re.M)
    at = text.find('{\n  "context"')
    if at < 0:
        return {}
    try:
        doc, _ = json.JSONDecoder().raw_decode(text[at:])
    except ValueError:
        return {}
    return {b["name"]: b for b in doc.get("benchmarks", [])}


def us(v):
    if v is None:
        return "n/a"
    if v >= 10_000:
        return f"{v / 1000:.0f} ms"
    if v >= 1000:
        return f"{v / 1000:.2f} ms"
    return f"{v:.0f} µs" if v >= 10 else f"{v:.2f} µs"


def ratio(a, b):
    if a is None or not b:
        return "n/a"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def mib(v):
    return "n/a" if v is None else f"{v:.1f} MiB"


rows = []


def row(what, ours, baseline, base_value, r):
    rows.append(f"| {what} | {ours} | {baseline} | {base_value} | {r} |")


base = read("baseline")
rr50, rr99 = pct(base, "raw cnats request-reply")
js50, js99 = pct(base, "raw JetStream publish (acked)")
runc50, runc99 = pct(base, "raw runc run --detach")

e2e = read("e2e")
s50, s99 = pct(e2e, "submit->SCHEDULED")
r50, r99 = pct(e2e, "submit->RUNNING")
b50, b99 = pct(e2e, "submit->RUNNING (burst)")
row("submit→SCHEDULED p50 (real stack, idle)", us(s50), "raw cnats request-reply p50", us(rr50), ratio(s50, rr50))
row("submit→SCHEDULED p99 (real stack, idle)", us(s99), "raw cnats request-reply p99", us(rr99), ratio(s99, rr99))
row("submit→SCHEDULED p50 (real stack, idle)", us(s50), "raw JetStream publish p50", us(js50), ratio(s50, js50))
row("submit→SCHEDULED p99 (real stack, idle)", us(s99), "raw JetStream publish p99", us(js99), ratio(s99, js99))
row("submit→RUNNING p50 (CVM, real runc)", us(r50), "raw `runc run` p50", us(runc50), ratio(r50, runc50))
row("submit→RUNNING p99 (CVM, real runc)", us(r99), "raw `runc run` p99", us(runc99), ratio(r99, runc99))
row("submit→RUNNING p50 (burst, queued)", us(b50), "raw `runc run` p50", us(runc50), ratio(b50, runc50))
row("submit→RUNNING p99 (burst, queued)", us(b99), "raw `runc run` p99", us(runc99), ratio(b99, runc99))

sim = read("fleet_sim")
placements = num(sim, r"^throughput:.*?([\d.]+) placements/s")
decisions = num(sim, r"^throughput:\s*([\d.]+) decisions/s")
sim_s50, sim_s99 = pct(sim, "submit->SCHEDULED")
sim_rr50, sim_rr99 = pct(sim, "raw request-reply (before)")
placements_s = "n/a" if placements is None else f"{placements:.0f}/s"
row("sustained placements/s, fleet-sim 5,000 nodes", placements_s, "raw request-reply, one at a time (1 / its p50)",
    "n/a" if not sim_rr50 else f"{1e6 / sim_rr50:.0f}/s",
    ratio(placements, 1e6 / sim_rr50 if sim_rr50 else None))
row("fleet-sim submit→SCHEDULED p50 at that load (queueing included)", us(sim_s50), "its raw request-reply p50", us(sim_rr50), ratio(sim_s50, sim_rr50))
row("fleet-sim submit→SCHEDULED p99 at that load (queueing included)", us(sim_s99), "its raw request-reply p99", us(sim_rr99), ratio(sim_s99, sim_rr99))
_, sim_rrl99 = pct(sim, "raw request-reply (during)")
if sim_rrl99 is not None:
    row("fleet-sim submit→SCHEDULED p99 (information: same contention)", us(sim_s99),
        "raw request-reply p99 measured during that load", us(sim_rrl99), ratio(sim_s99, sim_rrl99))

def launch_rows(name, where):
    launch = read(name)
    fs_line = re.search(r"^work dir filesystem\s+(\S+).*?(no journal|journal)?$", launch or "", re.M)
    on = f" ({fs_line.group(1)}, {fs_line.group(2) or 'n/a'})" if fs_line else where
    agent_ms = num(launch, r"^assignment -> RUNNING \(agent\)\s+median\s+([\d.]+) ms")
    raw_ms = num(launch, r"^raw runc run, same two bundles\s+median\s+([\d.]+) ms")
    row(f"agent launch{on}: assignment→RUNNING median", us(agent_ms * 1000 if agent_ms else None),
        "raw `runc run` of the same two bundles", us(raw_ms * 1000 if raw_ms else None),
        ratio(agent_ms, raw_ms))
    cache_ms = num(launch, r"^caching on: agent assignment->RUNNING\s+median\s+([\d.]+) ms")
    cache_raw_ms = num(launch, r"^caching on: raw runc, same bundles\s+median\s+([\d.]+) ms")
    if cache_ms is not None or cache_raw_ms is not None:
        row(f"agent launch with Caching on{on}: assignment→RUNNING median",
            us(cache_ms * 1000 if cache_ms else None),
            "raw `runc run` of the same bundles", us(cache_raw_ms * 1000 if cache_raw_ms else None),
            ratio(cache_ms, cache_raw_ms))


launch_rows("agent_launch", " (temp dir)")
launch_rows("agent_launch_journaled", " (journaled ext4)")

broker = gbench(read("broker_roundtrip"))
rt = next(iter(broker.values()), {})
row("GPU reserve round trip p50", us(rt.get("reserve_p50_us")), "raw request-reply p50 (same loop)",
    us(rt.get("raw_p50_us")), ratio(rt.get("reserve_p50_us"), rt.get("raw_p50_us")))
row("GPU reserve round trip p99", us(rt.get("reserve_p99_us")), "raw request-reply p99 (same loop)",
    us(rt.get("raw_p99_us")), ratio(rt.get("reserve_p99_us"), rt.get("raw_p99_us")))

decision = gbench(read("broker_decision"))
for name in ("BM_ChooseGpus8/1", "BM_ChooseGpus8/4", "BM_ChooseGpus8/8"):
    b = decision.get(name, {})
    row(f"GPU choice on an 8-GPU node, {name.split('/')[1]} GPU(s), p99", us(b.get("p99_us")),
        "first fit (no topology) p99", us(b.get("first_fit_p99_us")), ratio(b.get("p99_us"), b.get("first_fit_p99_us")))

placement_text = read("placement")
placement = gbench(placement_text)
# placement_bench prints a summary of CPU ns per decision: default search and full scan, same run.
m = re.search(r"^CachedCvm_Binpack\s+" + r"\s+".join([r"([\d.]+)"] * 6), placement_text, re.M)
for i, nodes in ((1, 5000), (2, 50000)):
    if m:
        ours, scan = float(m.group(i + 1)) / 1000, float(m.group(i + 4)) / 1000
    else:  # an older placement_bench: Google Benchmark JSON, no scan baseline
        b = placement.get(f"BM_CachedCvm_Binpack/{nodes}", {})
        t = b.get("cpu_time")
        unit = {"ns": 1e-3, "us": 1, "ms": 1e3}.get(b.get("time_unit", "ns"), 1e-3)
        ours, scan = (t * unit if t is not None else None), None
    row(f"one placement decision, {nodes:,} nodes (in-process CPU time)", us(ours),
        "full scan of the index, same run", us(scan), ratio(ours, scan))
    row(f"one placement decision, {nodes:,} nodes (in-process CPU time)", us(ours),
        "raw cnats request-reply p50", us(rr50), ratio(ours, rr50))

# Sessions (session_bench): cvmctl exec / port-forward into a Debian workspace, against the runc
# exec chain the agent runs and raw NATS, in the same run.
sess = read("session")


def rate(label):
    return num(sess, r"^" + re.escape(label) + r"\s+([\d.]+) MB/s")


def mbs(v):
    return "n/a" if v is None else f"{v:.0f} MB/s"


start50, _ = pct(sess, "exec start: cvmctl exec -- true")
chain50, _ = pct(sess, "exec start: raw runc exec chain")
one50, _ = pct(sess, "exec start: one runc exec (supervisor)")
row("exec start p50 (`cvmctl exec ws -- true`)", us(start50), "the agent's runc exec chain p50", us(chain50),
    ratio(start50, chain50))
row("exec start p50 (`cvmctl exec ws -- true`)", us(start50), "one `runc exec` p50", us(one50), ratio(start50, one50))
_, key99 = pct(sess, "keystroke echo: cvmctl exec -it")
_, raw_key99 = pct(sess, "keystroke echo: raw runc exec -t chain")
_, sess_rr99 = pct(sess, "raw NATS request-reply (1 byte)")
row("keystroke echo p99 (`cvmctl exec -it`)", us(key99), "the runc chain's ptys p99", us(raw_key99), ratio(key99, raw_key99))
row("keystroke echo p99 (`cvmctl exec -it`)", us(key99), "raw NATS request-reply p99", us(sess_rr99), ratio(key99, sess_rr99))
nats_mbs = rate("raw NATS publish, 128 KiB, 8 MiB window")
for label, ours, base_label, base in (
        ("exec stdout (`cvmctl exec ws -- head -c`)", "exec stdout: cvmctl exec -- head -c",
         "the runc chain's pipes", "exec stdout: raw runc exec chain"),
        ("exec stdin (`cvmctl exec -i ws -- cat`)", "exec stdin: cvmctl exec -i -- cat >/dev/null",
         "the runc chain's pipes", "exec stdin: raw runc exec chain"),
        ("port-forward download", "port: cvmctl port-forward", "direct TCP in the workspace", "port: direct TCP in the workspace")):
    v, b = rate(ours), rate(base)
    # Throughputs: higher is better, so the ratio is ours / baseline (1 would be the baseline's speed).
    row(label, mbs(v), base_label, mbs(b), ratio(v, b))
    row(label, mbs(v), "raw NATS publish, 128 KiB messages, 8 MiB window", mbs(nats_mbs), ratio(v, nats_mbs))

# The workspace's seccomp filter on a syscall loop in a workspace-spec container (seccomp_bench).
sec = read("seccomp")
for call in ("getppid", "fstat"):
    f = num(sec, r"^seccomp " + call + r": filtered\s+([\d.]+) ns/call")
    u = num(sec, r"^seccomp " + call + r": unfiltered\s+([\d.]+) ns/call")
    row(f"`{call}` in a loop, workspace seccomp filter on", "n/a" if f is None else f"{f:.0f} ns",
        "the same container without the filter", "n/a" if u is None else f"{u:.0f} ns", ratio(f, u))

rows.append("")
mem = []
for name in ("cvm-scheduler", "cvm-gpu-broker", "cvm-node-agent"):
    m = re.search(r"^memory " + re.escape(name) + r"\s+rest RSS\s+([\d.]+) MiB\s+load RSS\s+([\d.]+) MiB\s+peak VmHWM\s+([\d.]+) MiB", e2e, re.M)
    rest, load, hwm = (float(m.group(i)) for i in (1, 2, 3)) if m else (None, None, None)
    mem.append(f"| {name} | {mib(rest)} | {mib(load)} | {mib(hwm)} |")
rss = read("scheduler_rss")
m = re.search(r"scheduler VmRSS: (\d+) MiB with no nodes \(baseline\), (\d+) MiB with (\d+) nodes", rss)
sched_rss = f"{m.group(1)} MiB with no nodes → {m.group(2)} MiB with {int(m.group(3)):,} nodes" if m else "n/a"
agent_idle = num(read("agent_launch"), r"^agent RSS idle after the launches\s+([\d.]+) MiB")

phases = []
for a, b in (("SCHEDULED", "PREPARING"), ("PREPARING", "STARTING"), ("STARTING", "RUNNING")):
    p50, p99 = pct(e2e, f"  {a}->{b}")
    phases.append(f"{a}→{b} p50 {us(p50)}, p99 {us(p99)}")

fleet_line = re.search(r"^fleet: .*$", sim, re.M)
audit_line = re.search(r"^audit: .*$", sim, re.M)
failures = ""
try:
    with open(os.path.join(log_dir, "failures")) as f:
        failures = f.read().strip()
except OSError:
    pass

cpu = "unknown CPU"
try:
    with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
except OSError:
    pass
with open("/proc/loadavg") as f:
    load_after = " ".join(f.read().split()[:3])

print(f"""# cvm-control benchmark results

Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `scripts/bench.sh{' --quick' if quick else ''}`
in {seconds // 60} min {seconds % 60} s on {platform.node()}: {cpu}, {os.cpu_count()} CPUs, Linux
{platform.release()}. Load average before / after: {load_before} / {load_after}. Every baseline
was measured in this same run on this machine; ratios are ours / baseline (lower is better,
except for placements/s and MB/s).

| Measure | cvm-control | Baseline (same run) | Baseline value | Ratio |
|---|---|---|---|---|""")
print("\n".join(rows))
print("""## Memory of each service (real processes, e2e run)

"At rest": registered, idle, before any build. "Load": the highest VmRSS sampled every 20 ms
while the builds ran. "Peak": the kernel's VmHWM at the end.

| Service | At rest (VmRSS) | Under load (max VmRSS) | Peak (VmHWM) |
|---|---|---|---|""")
print("\n".join(mem))
print(f"""
- Scheduler with the fleet simulator's nodes registered (`bench/scheduler_rss.sh`): {sched_rss}.
- Node agent idle after launches (`agent_launch_bench`): {mib(agent_idle)}.

Where submit→RUNNING goes (e2e, one at a time, between the phase events): {"; ".join(phases)}.
What the agent does in each phase (image preparation, the supervising and inner containers) is
described in services/node-agent/README.md.

## Invariants reported by the runs

- fleet-sim: {fleet_line.group(0) if fleet_line else 'n/a'}
- {audit_line.group(0) if audit_line else 'audit: n/a'}
""")
if failures:
    print("## Failed steps\n\n```\n" + failures + "\n```\n")
print("""## How each figure is measured

- Baselines (`bench/baseline_bench`): raw cnats `natsConnection_Request` to an echo subscriber
  (200-byte payload, SendAsap as our bus adapter), raw `js_Publish` to a file-storage stream
  waiting for its ack, raw `runc run --detach` of the default busybox image unpacked by umoci
  (sleep entrypoint), deleted after each.
- submit→SCHEDULED / RUNNING (`bench/e2e_latency_bench`): nats-server, cvm-scheduler,
  cvm-gpu-broker and one cvm-node-agent as real processes; each build is published to
  CVM_BUILDS as cvmctl does (Nats-Msg-Id = build id) and timed from just before the publish to
  the event's arrival on `cvm.v1.builds.*.events`. One build at a time with cvmctl's default
  resources (1 CPU, 512 MiB; then DELETE), then a burst of 4 at 300m each. The scheduler runs with
  `--reservation-hold 2` so that holds of deleted builds do not fill this two-CPU node (the default
  30 s is for fleets). Each RUNNING is a CVM: the image unpacked onto the workspace's ID range, a
  supervising container that starts the inner one, so it is compared with one bare `runc run`.
- Placements/s (`cvm-fleet-sim`): 5,000 simulated nodes, one in-process scheduler replica and the
  broker, a closed loop of at most 100 undecided requests (so its latencies include queueing
  behind up to 99 others; the idle latency is the e2e row).
- Agent launch (`bench/agent_launch_bench`), GPU reserve (`bench/broker_roundtrip_bench`), GPU
  choice (`bench/broker_decision_bench`), placement decision (`bench/placement_bench`): see
  their sources; each measures its own baseline in the same process.
""")
