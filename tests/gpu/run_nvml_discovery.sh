#!/usr/bin/env bash
# Runs the node agent's GPU discovery (cvm-gpu-probe: NVML through dlopen("libnvidia-ml.so.1"))
# on a machine with a real NVIDIA GPU and checks it against nvidia-smi: same GPUs by UUID, same
# names, same total memory. Prepared for a GPU machine; the machines that build and test this
# project have no NVIDIA GPU, so CI does not run it (the fake NVML of tests/unit/gpu covers the
# code paths there).
#
#   tests/gpu/run_nvml_discovery.sh [BUILD_DIR]     # default: build/gpu-check (configured here)
#
# Exits 0 when every GPU nvidia-smi lists is discovered with the same UUID, name and memory (MiB),
# 1 on a mismatch, 2 when the machine has no NVIDIA driver or tools.
set -euo pipefail

cd "$(dirname "$0")/../.."
build="${1:-build/gpu-check}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "no nvidia-smi: this script needs a machine with the NVIDIA driver" >&2
  exit 2
fi

if [[ ! -x "$build/services/node-agent/cvm-gpu-probe" ]]; then
  if [[ ! -f "$build/build.ninja" ]]; then
    cmake --preset release -B "$build" -DCVM_BUILD_TESTS=OFF -DCVM_BUILD_BENCHMARKS=OFF
  fi
  cmake --build "$build" -j"$(nproc)" --target cvm-gpu-probe
fi
probe="$build/services/node-agent/cvm-gpu-probe"

echo "== nvidia-smi"
nvidia-smi --query-gpu=index,uuid,name,memory.total,pci.bus_id,mig.mode.current --format=csv
echo "== nvidia-smi topo -m"
nvidia-smi topo -m || true
echo "== cvm-gpu-probe"
json="$(mktemp)"
trap 'rm -f "$json"' EXIT
"$probe" >"$json"
cat "$json"

# Compare: every GPU of nvidia-smi must be in the probe's output with the same name and memory.
# nvidia-smi reports memory in MiB (memory.total); NVML's total is bytes.
python3 - "$json" <<'PY'
import csv, io, json, subprocess, sys

probe = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
whole = {g["uuid"]: g for g in probe if not g.get("mig_parent_uuid")}
out = subprocess.run(
    ["nvidia-smi", "--query-gpu=uuid,name,memory.total", "--format=csv,noheader,nounits"],
    check=True, capture_output=True, text=True).stdout
failures = 0
rows = list(csv.reader(io.StringIO(out), skipinitialspace=True))
for uuid, name, mib in rows:
    g = whole.get(uuid)
    if g is None:
        print(f"MISSING  {uuid} ({name}) not discovered"); failures += 1; continue
    got_mib = int(g["memory_bytes"]) // (1 << 20)
    ok = g["name"] == name and abs(got_mib - int(mib)) <= 1 and g["vendor"] == "NVIDIA"
    print(f"{'OK      ' if ok else 'MISMATCH'} {uuid}: name {g['name']!r} vs {name!r}, "
          f"memory {got_mib} MiB vs {mib} MiB, minor {g['minor']}, bus {g['pci_bus_id']}, "
          f"NUMA {g.get('numa_node', '?')}, NVLink peers {len(g.get('nvlink_peers', []))}, "
          f"NVSwitch links {g.get('nvswitch_links', 0)}, MIG {g.get('mig_enabled', False)}, "
          f"healthy {g['healthy']}")
    failures += 0 if ok else 1
extra = set(whole) - {r[0] for r in rows}
for uuid in sorted(extra):
    if whole[uuid]["vendor"] == "NVIDIA":
        print(f"EXTRA    {uuid} discovered but not listed by nvidia-smi"); failures += 1
print(f"{len(rows)} GPU(s) from nvidia-smi, {len(probe)} device(s) from cvm-gpu-probe, "
      f"{failures} problem(s)")
sys.exit(1 if failures or not rows else 0)
PY
