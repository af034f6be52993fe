#!/usr/bin/env bash
# Installs what cvm-control needs to build, run and test on Debian 12, only what is missing.
# Run as root (or with sudo available).
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libnats-dev nats-server
  libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev libboost-dev prometheus-cpp-dev nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libarchive-dev
  runc umoci skopeo buildah busybox-static
  mmdebstrap  # the Debian workspace image (scripts/build-debian-image.sh) of the machine tests
  docker-registry prometheus python3 python3-yaml
  clang-format clang-tidy
  clang libclang-rt-14-dev  # libFuzzer and the sanitizer runtimes for scripts/fuzz.sh
  iproute2 procps util-linux jq curl ca-certificates
  tmux openssh-client rsync  # the terminal and SSH tests of cvmctl shell / proxy
  containernetworking-plugins iptables lxcfs  # network (CNI) and lxcfs of the workspaces
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: everything is installed"
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
# Debian starts these daemons on install; the stack runs its own instances on its own ports.
for svc in nats-server prometheus prometheus-node-exporter docker-registry; do
  $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
done
