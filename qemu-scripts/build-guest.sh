#!/usr/bin/env bash
# Builds the test guest once: Debian's kernel (fetched with apt-get download) and a busybox
# initramfs whose init loads the virtio modules and runs a scenario script from
# qemu-scripts/guest/scenarios/ (chosen on the kernel command line: remapblk.script=NAME).
# Cached under $REMAPBLK_GUEST_DIR (default target/guest); a second run only rebuilds the
# initramfs when the guest scripts changed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
dir=${REMAPBLK_GUEST_DIR:-$root/target/guest}
mkdir -p "$dir"
"$here/ensure-packages.sh"

# Kernel and modules: the virtio ones init loads, and ext4 with what it needs (loaded by the
# crash-lab scenarios; the Debian kernel's ext4 also mounts ext2). Fetched again when one is
# missing, as after this list grew.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4"
have_modules() {
    local m
    for m in $modules; do [ -f "$dir/modules/$m.ko" ] || return 1; done
}
if [ ! -f "$dir/vmlinuz" ] || ! have_modules; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || { echo "build-guest: cannot find the Debian kernel package" >&2; exit 1; }
    echo "build-guest: fetching $pkg"
    rm -rf "$dir/dl" "$dir/kernel" "$dir/modules"
    mkdir -p "$dir/dl"
    (cd "$dir/dl" && apt-get download "$pkg" 2>/dev/null)
    dpkg -x "$dir"/dl/*.deb "$dir/kernel"
    mkdir -p "$dir/modules"
    for m in $modules; do
        f=$(find "$dir/kernel/lib/modules" -name "$m.ko*" | head -n 1)
        [ -n "$f" ] || { echo "build-guest: module $m not in $pkg" >&2; exit 1; }
        case "$f" in
            *.xz) xz -dc "$f" > "$dir/modules/$m.ko" ;;
            *.zst) zstd -dqc "$f" > "$dir/modules/$m.ko" ;;
            *) cp "$f" "$dir/modules/$m.ko" ;;
        esac
    done
    cp "$dir"/kernel/boot/vmlinuz-* "$dir/vmlinuz.tmp"
    mv "$dir/vmlinuz.tmp" "$dir/vmlinuz"
    rm -rf "$dir/dl" "$dir/kernel"
fi

# Initramfs: rebuilt only when its inputs change.
stamp=$(cat "$here/build-guest.sh" /sbin/mke2fs /sbin/e2fsck "$here"/guest/init "$here"/guest/lib/*.sh "$here"/guest/*.c "$here"/guest/scenarios/*.sh /bin/busybox | sha256sum | cut -c1-16)
if [ -f "$dir/initramfs.gz" ] && [ "$(cat "$dir/initramfs.stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi
echo "build-guest: building initramfs"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,lib,modules,scenarios}
cp /bin/busybox "$stage/bin/busybox"
cp "$dir"/modules/*.ko "$stage/modules/"
cp "$here/guest/init" "$stage/init"
cp "$here"/guest/scenarios/*.sh "$stage/scenarios/"
cp "$here"/guest/lib/*.sh "$stage/lib/"
# mke2fs and e2fsck with the libraries they load, for the scenarios that make and check file
# systems inside the guest.
for bin in /sbin/mke2fs /sbin/e2fsck; do
    cp "$bin" "$stage/sbin/"
    ldd "$bin" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
done
ln -s mke2fs "$stage/sbin/mkfs.ext4"
ln -s mke2fs "$stage/sbin/mkfs.ext2"
gcc -O2 -static -o "$stage/bin/blkzero" "$here/guest/blkzero.c"
gcc -O2 -static -o "$stage/bin/incore" "$here/guest/incore.c"
chmod +x "$stage/init" "$stage"/scenarios/*.sh
(cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$dir/initramfs.gz.tmp"
mv "$dir/initramfs.gz.tmp" "$dir/initramfs.gz"
echo "$stamp" > "$dir/initramfs.stamp"
