#!/bin/sh
# Builds the default workspace image: a tiny OCI image layout holding Debian's busybox-static.
#
#   scripts/build-default-image.sh OUT_DIR [TAG]     (TAG defaults to "latest")
#
# The result is usable as the image reference oci:OUT_DIR:TAG. Needs only `umoci` and
# `busybox-static` (apt-get install umoci busybox-static); no network, no Docker. Run as root:
# the unpack/repack round trip keeps file ownership as root:root inside the image.
#
# Idempotent: re-running replaces TAG in OUT_DIR (other tags in the layout are kept) and
# garbage-collects blobs nothing refers to any more.
#
# /sbin/init is deliberately NOT linked to busybox: the agent makes /sbin/init PID 1 when an image
# has it (systemd workspaces), and busybox init without an inittab would try to spawn gettys.
# Without it the agent uses its sleep entrypoint, which is what this image is for.
set -eu

usage() {
  echo "usage: $0 OUT_DIR [TAG]" >&2
  exit 2
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  usage
fi
out_dir=$1
tag=${2:-latest}

busybox_bin=${BUSYBOX:-/bin/busybox}
if [ "$(id -u)" != 0 ]; then
  echo "$0: run as root (umoci unpack/repack must chown the rootfs)" >&2
  exit 1
fi
command -v umoci >/dev/null 2>&1 || {
  echo "$0: umoci not found (apt-get install umoci)" >&2
  exit 1
}
[ -x "$busybox_bin" ] || {
  echo "$0: $busybox_bin not found (apt-get install busybox-static)" >&2
  exit 1
}

work=$(mktemp -d "${TMPDIR:-/tmp}/cvm-default-image.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

if [ ! -f "$out_dir/oci-layout" ]; then
  mkdir -p "$(dirname "$out_dir")"
  umoci init --layout "$out_dir"
fi
# Replacing the tag (rather than failing because it exists) keeps the script idempotent.
if umoci ls --layout "$out_dir" | grep -qx "$tag"; then
  umoci rm --image "$out_dir:$tag"
fi
umoci new --image "$out_dir:$tag"

# Unpack the empty image, fill its rootfs, repack: the layer is then an ordinary tar diff and the
# manifest/config stay consistent without hand-written JSON.
bundle=$work/bundle
umoci unpack --image "$out_dir:$tag" "$bundle"
rootfs=$bundle/rootfs

for d in bin sbin usr/bin usr/sbin etc root tmp proc sys dev run var/tmp home; do
  mkdir -p "$rootfs/$d"
done
chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
chmod 0700 "$rootfs/root"
cp "$busybox_bin" "$rootfs/bin/busybox"
chmod 0755 "$rootfs/bin/busybox"

# One symlink per applet, at the path busybox itself suggests (bin/sh, usr/bin/id, ...).
"$busybox_bin" --list-full | while read -r applet; do
  case "$applet" in
    sbin/init | linuxrc | bin/busybox) continue ;;
  esac
  dir=$(dirname "$applet")
  [ "$dir" = "." ] && continue
  mkdir -p "$rootfs/$dir"
  # Relative targets keep the links valid whatever the rootfs is mounted on.
  case "$dir" in
    bin) target=busybox ;;
    sbin) target=../bin/busybox ;;
    usr/bin | usr/sbin) target=../../bin/busybox ;;
    *) target=/bin/busybox ;;
  esac
  ln -sf "$target" "$rootfs/$applet"
done

cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo "cvm-default" >"$rootfs/etc/hostname"
: >"$rootfs/etc/hosts"
: >"$rootfs/etc/resolv.conf"

umoci repack --image "$out_dir:$tag" "$bundle"
umoci config --image "$out_dir:$tag" \
  --config.env "PATH=/usr/sbin:/usr/bin:/sbin:/bin" \
  --config.workingdir / \
  --config.cmd /bin/sh \
  --author "cvm-control build-default-image.sh"
umoci gc --layout "$out_dir"

echo "built oci:$out_dir:$tag"
