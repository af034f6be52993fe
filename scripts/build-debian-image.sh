#!/bin/sh
# Builds the Debian workspace image: Debian bookworm with systemd as /sbin/init, dbus, Docker,
# sudo and the usual network tools, made with mmdebstrap from the apt mirror and turned into an
# OCI image layout with umoci. This is the image a workspace "is a real machine" with: systemd
# boots, dockerd starts at boot, a non-root user `dev` has sudo and the docker group.
#
#   scripts/build-debian-image.sh OUT_DIR [TAG]     (TAG defaults to "debian")
#
# The result is usable as the image reference oci:OUT_DIR:TAG. Cached by its recipe: the sha256
# of the package list and this script's hooks is kept next to the layout (OUT_DIR/TAG.recipe), and
# a second run with the same recipe does nothing, so tests can call it on every run.
# Needs mmdebstrap and umoci (apt-get install mmdebstrap umoci) and root.
set -eu

out_dir=${1:?usage: $0 OUT_DIR [TAG]}
tag=${2:-debian}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-}

# Everything a user expects of a small Debian machine; systemd-sysv makes /sbin/init systemd.
packages="systemd,systemd-sysv,dbus,docker.io,iproute2,iptables,procps,sudo,iputils-ping,\
ca-certificates,kmod,less,netbase,openssh-server,rsync"

[ "$(id -u)" = 0 ] || { echo "$0: run as root" >&2; exit 1; }
for tool in mmdebstrap umoci sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$0: $tool not found (apt-get install $tool)" >&2; exit 1; }
done

# The recipe: what goes into the image. Any change to it (or to this file) rebuilds.
recipe=$( (echo "$suite $packages"; cat "$0") | sha256sum | cut -d' ' -f1)
if [ -f "$out_dir/oci-layout" ] && [ "$(cat "$out_dir/$tag.recipe" 2>/dev/null)" = "$recipe" ] &&
  umoci ls --layout "$out_dir" 2>/dev/null | grep -qx "$tag"; then
  echo "cached oci:$out_dir:$tag ($recipe)"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/cvm-debian-image.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

# --skip=output/dev: no device nodes in the layer (the runtime makes /dev); the hooks make the
# machine usable the way a cloud image is: a user with sudo and docker, no root password, a
# machine-id made at first boot, no units that cannot run in a container without a kernel of
# their own (they are masked, which is what LXC's and Sysbox's images do).
# shellcheck disable=SC2016
mmdebstrap --variant=minbase --include="$packages" --skip=output/dev \
  --customize-hook='chroot "$1" useradd --create-home --shell /bin/bash --groups sudo,docker dev' \
  --customize-hook='echo "dev ALL=(ALL) NOPASSWD:ALL" >"$1/etc/sudoers.d/dev"; chmod 0440 "$1/etc/sudoers.d/dev"' \
  --customize-hook=': >"$1/etc/machine-id"; rm -f "$1/var/lib/dbus/machine-id"' \
  --customize-hook='echo cvm-debian >"$1/etc/hostname"' \
  --customize-hook='for u in systemd-remount-fs.service sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount dev-hugepages.mount proc-sys-fs-binfmt_misc.automount systemd-binfmt.service systemd-modules-load.service systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service getty@tty1.service console-getty.service systemd-firstboot.service; do ln -sf /dev/null "$1/etc/systemd/system/$u"; done' \
  "$suite" "$work/rootfs.tar" $mirror

if [ ! -f "$out_dir/oci-layout" ]; then
  mkdir -p "$(dirname "$out_dir")"
  umoci init --layout "$out_dir"
fi
if umoci ls --layout "$out_dir" | grep -qx "$tag"; then
  umoci rm --image "$out_dir:$tag"
fi
umoci new --image "$out_dir:$tag"
# mmdebstrap's tar goes in verbatim: the layer is what a real tool made, "./" entry and all.
umoci raw add-layer --image "$out_dir:$tag" "$work/rootfs.tar"
umoci config --image "$out_dir:$tag" \
  --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --config.workingdir / \
  --config.cmd /sbin/init \
  --author "cvm-control build-debian-image.sh"
umoci gc --layout "$out_dir"
echo "$recipe" >"$out_dir/$tag.recipe"
echo "built oci:$out_dir:$tag ($recipe)"
