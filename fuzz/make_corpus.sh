#!/usr/bin/env bash
# Regenerates the seed corpora under fuzz/corpus/ from the readable messages below (protoc
# --encode turns text format into the wire bytes the services read). Each seed is the target's
# framing (see fuzz_input.h) followed by the payload.
set -euo pipefail
cd "$(dirname "$0")/.."
out=fuzz/corpus
rm -rf "$out"
# seed TARGET NAME PREFIX_PRINTF MESSAGE TEXT: PREFIX (printf format) + MESSAGE encoded from TEXT.
seed() {
  local target=$1 name=$2 prefix=$3 message=$4 text=$5
  mkdir -p "$out/$target"
  {
    printf "$prefix"
    printf '%s' "$text" | protoc -Iproto --encode="cvm.v1.$message" proto/cvm/v1/*.proto
  } >"$out/$target/$name"
}
# text TARGET NAME PREFIX_PRINTF TEXT: plain text input.
text() {
  mkdir -p "$out/$1"
  { printf "$3"; printf '%s' "$4"; } >"$out/$1/$2"
}

build='build_id: "b1" workspace_id: "ws1" owner: "alice" image: "oci:/var/lib/cvm/images/default:latest" transition: START resources { cpu_millicores: 500 memory_bytes: 268435456 }'
gpu_build='build_id: "b2" workspace_id: "ws2" owner: "bob" image: "docker://debian:12" transition: START resources { gpu { count: 1 vendor: NVIDIA min_memory_bytes: 8589934592 } } use_cvm: true'
seed fuzz_build_request start '\x1f\x02b1' BuildRequest "$build"
seed fuzz_build_request gpu '\x06\x00' BuildRequest "$gpu_build"
seed fuzz_build_request stop '\x00\x00' BuildRequest 'build_id: "b3" workspace_id: "ws1" transition: STOP'
seed fuzz_build_request invalid '\x01\x02b4' BuildRequest 'build_id: "b 4" workspace_id: ""'

node='node_id: "node-1" heartbeat_unix_ms: 1700000000000 host { kernel_version: "6.1.0" shiftfs_loaded: true idmapped_mounts: true bare_metal: true }
runtime { runtime: "runc" runc_version: "1.1.5" ready: true supervisor: true }
capacity { cpu_millicores: 8000 memory_bytes: 17179869184 } allocated { cpu_millicores: 1000 memory_bytes: 1073741824 }
gpus { uuid: "GPU-a" vendor: NVIDIA memory_bytes: 17179869184 minor: 0 healthy: true nvlink_peers { uuid: "GPU-b" links: 4 } pci_path: "0000:00:01.0/0000:01:00.0" }
gpus { uuid: "GPU-b" vendor: NVIDIA memory_bytes: 17179869184 minor: 1 healthy: true mig_enabled: true }
gpus { uuid: "MIG-1" vendor: NVIDIA memory_bytes: 10737418240 minor: 1 healthy: true mig_parent_uuid: "GPU-b" mig_profile: "1g.10gb" }
gpus { uuid: "GPU-c" vendor: AMD minor: 2 healthy: false last_xid: 79 last_health_event_unix_ms: 1699999990000 }'
seed fuzz_node_status gpus '\x01' NodeStatus "$node"
seed fuzz_node_status plain '\x00' NodeStatus 'node_id: "vm-1" heartbeat_unix_ms: 5 host { selinux_enabled: true virtualization: "Google Compute Engine" } runtime { ready: false detail: "no runc" } capacity { cpu_millicores: 2000 memory_bytes: 4294967296 }'

seed fuzz_node_assignment assignment '\x00' NodeAssignment "request { $build } node_id: \"node-1\" cvm: true gpus { uuid: \"GPU-a\" } lease_id: \"l1\" assigned_unix_ms: 1700000000000 caching: true"
seed fuzz_node_assignment workspace '\x01' WorkspaceRecord 'workspace_id: "ws1" node_id: "node-1" build_id: "b1" phase: RUNNING desired: START image: "oci:/img:latest" uid_base: 165536 uid_count: 65536 phase_times { phase: PREPARING unix_ms: 1 }'
seed fuzz_node_assignment placement '\x02' PlacementRecord "assignment { request { $gpu_build } node_id: \"node-2\" } replaced_node_id: \"node-1\""

seed fuzz_build_event running '\x00' BuildEvent 'build_id: "b1" workspace_id: "ws1" phase: RUNNING node_id: "node-1" warnings: "/tmp is emptied" gpu_uuids: "GPU-a" timestamp_unix_ms: 1700000000000'
seed fuzz_build_event failed '\x00' BuildEvent 'build_id: "b2" phase: FAILED reason: NO_ELIGIBLE_NODE message: "0/3 nodes fit: 3 SELinux enforcing"'
seed fuzz_build_event lost '\x01' NodeLostNotice 'node_id: "node-1" last_heartbeat_unix_ms: 1000 detected_unix_ms: 20000'

seed fuzz_settings caching '\x07caching\x02on' InfrastructureSettings 'cvm_enabled: true default_to_cvm: true caching: true auto_load_shiftfs: true'
seed fuzz_settings empty '\x11auto-load-shiftfs\x05false' InfrastructureSettings ''

seed fuzz_gpu reserve '\x00' GpuReserveRequest 'count: 2 min_memory_bytes: 8589934592 workspace_id: "ws2" build_id: "b2" vendor: NVIDIA candidate_nodes: "gpu-node-0"'
seed fuzz_gpu reserve_node '\x00' GpuReserveRequest 'node_id: "gpu-node-1" count: 1 workspace_id: "ws3"'
seed fuzz_gpu release '\x01' GpuReleaseRequest 'workspace_id: "ws2" lease_id: "l1" node_id: "gpu-node-0" gpu_uuids: "GPU-0-1"'
seed fuzz_gpu reply '\x02' GpuReserveReply 'ok: true lease_id: "l1" gpus { uuid: "GPU-0-1" } node_id: "gpu-node-0"'
seed fuzz_gpu lease '\x03' GpuLease 'lease_id: "l1" node_id: "gpu-node-0" gpu_uuid: "GPU-0-1" workspace_id: "ws2" build_id: "b2" leased_unix_ms: 1700000000000'

# The hold goes first as a length-prefixed string (its length byte computed here).
hold=$(printf '%s' 'build_id: "b9" cpu_millicores: 500 memory_bytes: 268435456 expires_unix_ms: 1030000' |
  protoc -Iproto --encode=cvm.v1.CapacityHold proto/cvm/v1/*.proto | od -An -tx1 | tr -d ' \n' | sed 's/../\\x&/g')
hold_len=$(printf "$hold" | wc -c)
seed fuzz_capacity_ledger holds "$(printf '\\x%02x' "$hold_len")$hold" CapacityLedger 'node_id: "node-1" holds { build_id: "b1" cpu_millicores: 1000 memory_bytes: 1073741824 expires_unix_ms: 1020000 } holds { build_id: "b2" cpu_millicores: 1000 expires_unix_ms: 10 }'

text fuzz_agent_files status '\x00' '{"state":"running","pid":42,"message":"inner container running"}'
text fuzz_agent_files idranges '\x01' '{"version":1,"pool":{"start":100000,"count":1048576},"width":65536,"ranges":{"ws1":{"base":100000,"count":65536},"ws2":{"base":231072,"count":65536}}}'
text fuzz_agent_files index '\x02' '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:00","size":1,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}'
text fuzz_agent_files subuid '\x03' $'root:100000:1048576\n# comment\nalice:2000000:65536\n'
text fuzz_agent_files runc_status '\x04' 'running'
text fuzz_agent_files kernel '\x05' $'6.1.0-18-amd64\n'
text fuzz_agent_files selinux '\x06' '1'
text fuzz_agent_files cpus '\x07' $'0-3,8,10-11\n'
text fuzz_agent_files meminfo '\x08' $'MemTotal:       16318480 kB\nMemFree:         1234 kB\n'
text fuzz_agent_files versions '\x09' $'runc version 1.1.5+ds1\ncommit: v1.1.5\nspec: 1.0.2-dev\n'
text fuzz_agent_files capmask '\x0a' $'Name:\tcat\nCapBnd:\t000001ffffffffff\n'
text fuzz_agent_files procgpu '\x0b' $'Model: \t\t NVIDIA A100-SXM4-40GB\nIRQ:   \t\t 142\nGPU UUID: \t GPU-12345678-1234-1234-1234-123456789abc\nBus Location: \t 0000:07:00.0\nDevice Minor: \t 0\n'
text fuzz_agent_files hex '\x0c' $'0x10de\n'
text fuzz_agent_files ldd '\x0d' $'\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n'
text fuzz_agent_files imageref '\x0e' 'oci:/var/lib/cvm/images/default:latest'
text fuzz_agent_files modules '\x0f' $'shiftfs 32768 0 - Live 0x0\noverlay 151552 0 - Live 0x0\n'
text fuzz_agent_files logformat '\x10' 'json'
text fuzz_agent_files quantity '\x11' '1.5Gi'
echo "seeds: $(find "$out" -type f | wc -l) files, $(du -sh "$out" | cut -f1)"
