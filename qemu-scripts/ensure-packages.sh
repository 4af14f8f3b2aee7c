#!/usr/bin/env bash
# Installs the Debian packages the tests need when they are missing: for the guest, QEMU,
# busybox, cpio and gcc (the guest's small static helper); e2fsprogs for the crash-lab
# scenarios; xfsprogs for the overlay's reflink test. Never skips: a missing package is
# installed or this fails loudly.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
if ! { [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x blkdiscard >/dev/null; }; then need+=(busybox-static); fi
command -v cpio >/dev/null || need+=(cpio)
command -v gcc >/dev/null || need+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v python3 >/dev/null || need+=(python3)
# mkfs.ext4 and e2fsck on the host, and copied into the guest, for the crash-lab scenarios.
{ [ -x /sbin/mke2fs ] && [ -x /sbin/e2fsck ]; } || need+=(e2fsprogs)
# tests/overlay.rs makes a loop-mounted XFS with reflinks for the overlay's reflink mode.
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
if [ ${#need[@]} -gt 0 ]; then
    echo "ensure-packages: installing ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "ensure-packages: need root to apt-get install ${need[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
