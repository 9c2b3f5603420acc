# Recipe of the debian12efi test image set, sourced by images/build-test-images
# (which see). Modelled on today's kiwi-built ost-images (oVirt/ost-images
# configs/default.xml, config.sh.in, packages.xml):
#   - UEFI only: GPT with an EFI System Partition and an ext4 root, no BIOS boot
#     code at all. Debian's signed chain shim -> GRUB -> kernel, so the guest boots
#     with Secure Boot and Microsoft's keys (the firmware libvirt picks by itself on
#     q35) and without Secure Boot alike;
#   - predictable NIC names (no net.ifnames=0): NetworkManager keyfiles for
#     enp1s0..enp6s0 with DUID-LL/IAID-by-MAC DHCPv6, hostname from DHCP;
#   - cloud-init (NoCloud, network left to NetworkManager), firewalld, qemu-guest-agent;
#   - every layer a whole qcow2 without backing file.
# shellcheck shell=bash disable=SC2034,SC2154  # the variables are shared with the driver

DISTRO=debian12efi              # no hyphen: the plugin splits <distro>-<layer> at the first one
SUITE=bookworm
DISK_SIZE_MIB=2048              # virtual size of the disk
ESP_MIB=64                      # the ESP: 1 MiB .. 65 MiB; the root partition the rest

BASE_PACKAGES=(
    linux-image-cloud-amd64 systemd-sysv udev dbus
    # Secure Boot chain: shim signed by Microsoft's UEFI CA, GRUB and the kernel
    # signed by Debian (shim-signed brings mokutil along)
    shim-signed grub-efi-amd64-signed
    openssh-server network-manager iproute2 iputils-ping
    cloud-init
    # firewalld exits at start ("INVALID_PROTOCOL: esp") without /etc/protocols
    firewalld nftables netbase
    python3             # ansible modules run on it, as on real ost-images
    qemu-guest-agent    # warm start: a restored guest is moved to its new network through it
)
# Upper layers: whole images (the base tree, a copy of it with the layer's
# packages installed offline). The same extra packages as the debian12 set.
LAYERS=(engine-installed host-installed)
declare -A LAYER_ROLE=([engine-installed]=engine [host-installed]=host)
declare -A LAYER_PACKAGES=([engine-installed]="less" [host-installed]="netcat-openbsd python3-pytest lvm2")

# Boot-time check (build-test-images): OVMF without Secure Boot, 640 MiB, 1 vCPU;
# every layer has cloud-init. The budget is for the machine whose kernel-alone boot
# takes BOOT_REFERENCE s, scaled to this one's (build-test-images). Measured
# 2026-12-06 on that machine: cloud-init done after 92-96 s (on 2026-12-04 a faster
# lab machine took 60 s; the goal of issue 27 is 35 s there); the budget leaves 35 %
# for noise and catches a wait that runs into its timeout.
BOOT_FIRMWARE=efi BOOT_MEMORY_MIB=640 BOOT_BUDGET=130 BOOT_BUDGET_CLOUD_INIT=130
declare -A BOOT_CLOUD_INIT=([base]=1 [engine-installed]=1 [host-installed]=1)

SET_TOOLS=(mkfs.vfat mmd mcopy)
SPEC_DEFINES=(--define "ost_flat 1" --define "with_cloud_installed 0")
if [ "$bios_twin" = 1 ]; then
    SET_TOOLS+=(extlinux)
    MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
    [ -r "$MBR_BIN" ] || die "missing $MBR_BIN (Debian package syslinux-common)"
fi
export MTOOLS_SKIP_CHECK=1      # mtools on an image file, no drive configuration

# The kernel command line, UEFI and BIOS twin alike: the kernel logs on the
# serial console (the last console= is /dev/console), as kiwi's kernelcmdline.
kernel_cmdline() { echo "root=UUID=$ROOT_UUID ro console=tty1 console=ttyS0,115200n8"; }

configure_base() {
    find_kernel
    local f
    for f in usr/lib/shim/shimx64.efi.signed usr/lib/shim/mmx64.efi.signed \
             usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed; do
        [ -s "$ROOT/$f" ] || { echo "missing /$f"; return 1; }
    done
    # Identifiers of the disk, the same in every layer (each is a disk of its own).
    ESP_VOLID=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ' | tr a-f A-F)
    ESP_UUID=${ESP_VOLID:0:4}-${ESP_VOLID:4:4}
    DISK_GUID=$(cat /proc/sys/kernel/random/uuid)
    ESP_PARTUUID=$(cat /proc/sys/kernel/random/uuid)
    ROOT_PARTUUID=$(cat /proc/sys/kernel/random/uuid)

    # Hostname from DHCP: NetworkManager sets the one DHCP gives as the transient
    # hostname, which systemd-hostnamed refuses while there is a static one (even
    # "localhost"): no static hostname, the kernel's is "localhost" until DHCP
    # answers. A NoCloud seed's hostname (cloud-init makes it the static one) wins.
    : >"$ROOT/etc/hostname"
    rm -f "$ROOT/etc/resolv.conf"   # written by NetworkManager at boot

    # The ESP on /boot/efi as on kiwi's images, but mounted only when something
    # looks there: no vfat mount (nor waiting for its device) at boot. No fsck of
    # the root at boot (pass 0), as on kiwi's XFS root (fsck.xfs does nothing):
    # it held everything behind it for 1.5-2 s under TCG.
    mkdir -p "$ROOT/boot/efi"
    cat >"$ROOT/etc/fstab" <<EOF
UUID=$ROOT_UUID / ext4 errors=remount-ro 0 0
UUID=$ESP_UUID /boot/efi vfat umask=0077,nofail,x-systemd.automount,x-systemd.device-timeout=10s 0 0
EOF

    # NetworkManager as kiwi's config.sh.in sets it up: stable IPv6 addresses
    # (EUI-64) and DHCPv6 by DUID-LL with the IAID from the MAC (the networks'
    # DHCPv6 reservations are keyed on them), and one keyfile per NIC, enp1s0 ..
    # enp6s0 (PCIe buses 1-6 on q35), only the first one may hold the default route.
    cat >"$ROOT/etc/NetworkManager/conf.d/10-stable-ipv6-addr.conf" <<'EOF'
[connection]
ipv6.addr-gen-mode=0
ipv6.dhcp-duid=ll
ipv6.dhcp-iaid=mac
EOF
    # ifupdown is not installed: its dispatcher hook only fails at every event.
    rm -f "$ROOT/etc/NetworkManager/dispatcher.d/01-ifupdown"
    local i iface never_default
    for i in 1 2 3 4 5 6; do
        iface=enp${i}s0
        never_default=false
        [ "$i" -gt 1 ] && never_default=true
        cat >"$ROOT/etc/NetworkManager/system-connections/$iface" <<EOF
[connection]
id=$iface
uuid=$(cat /proc/sys/kernel/random/uuid)
type=ethernet
autoconnect=true
interface-name=$iface

[ipv6]
method=auto
never-default=$never_default

[ipv4]
method=auto
never-default=$never_default
EOF
        chmod 0600 "$ROOT/etc/NetworkManager/system-connections/$iface"
    done

    install -d -m 0700 "$ROOT/root/.ssh"
    install -m 0600 "$OUT/${DISTRO}_id_rsa.pub" "$ROOT/root/.ssh/authorized_keys"
    cat >"$ROOT/etc/ssh/sshd_config.d/ost-images.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
EOF

    # cloud-init: a NoCloud seed if there is one, else DataSourceNone. With this
    # list (one source plus None) ds-identify never searches: cloud-init runs at
    # every boot, seed or not (about 15-19 s of a TCG boot: its first two stages
    # come before sysinit.target), and without a seed it only reports "done". The
    # NICs stay NetworkManager's keyfiles'. The image's SSH host keys are kept
    # unless a seed says otherwise (no key generation at boot). The modules: those
    # of EL's cloud.cfg (cloud_init_module_lists).
    {
        cat <<'EOF'
datasource_list: [NoCloud, None]
network: {config: disabled}
ssh_deletekeys: false
EOF
        cloud_init_module_lists
    } >"$ROOT/etc/cloud/cloud.cfg.d/99-ost-images.cfg"
    : >"$ROOT/etc/machine-id"   # every boot of a fresh image makes its own

    # firewalld (enabled by its package) in its default zone, public: ssh and
    # dhcpv6-client, plus cockpit as on kiwi's images.
    chroot "$ROOT" firewall-offline-cmd --add-service=cockpit
    chroot "$ROOT" firewall-offline-cmd --list-all

    # The journal persists across reboots, as on kiwi's images.
    mkdir -p "$ROOT/var/log/journal"

    finish_base_tree
}

# Debian's signed GRUB reads EFI/debian/grub.cfg on the ESP it started from. No
# menu, nothing to wait for: straight to the kernel.
write_grub_cfg() {  # write_grub_cfg FILE
    cat >"$1" <<EOF
# pytest-ostimages $DISTRO: no menu, no timeout, boot at once.
set timeout=0
search --no-floppy --fs-uuid --set=root $ROOT_UUID
linux /boot/vmlinuz-$KVER $(kernel_cmdline)
initrd /boot/initrd.img-$KVER
boot
EOF
}

# A whole UEFI disk from the root tree TREE, without mounting anything: GPT, the
# ESP made as a file with mkfs.vfat and mtools and copied in, the root filesystem
# made in place by mkfs.ext4 -d.
make_efi_disk() {  # make_efi_disk TREE QCOW2
    local tree=$1 img=$2 raw=$WORK/disk.raw esp=$WORK/esp.img start size
    rm -f "$raw" "$esp"
    truncate -s "${DISK_SIZE_MIB}M" "$raw"
    # A fresh (zero) file: sfdisk writes a protective MBR with nothing in its boot
    # code area, and no BIOS boot partition.
    sfdisk --no-reread --no-tell-kernel "$raw" <<EOF
label: gpt
label-id: $DISK_GUID
start=2048, size=$((ESP_MIB * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$ESP_PARTUUID, name="EFI System Partition"
start=$(((1 + ESP_MIB) * 2048)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=$ROOT_PARTUUID, name="root"
EOF
    # The root filesystem's size from the partition table: sfdisk ends the last
    # partition on a MiB boundary before the backup GPT, not at the disk's end.
    read -r start size < <(sfdisk -d "$raw" | sed -n "s|^${raw}2 : start= *\([0-9]*\), size= *\([0-9]*\),.*|\1 \2|p") || true
    [ -n "${size:-}" ] || { echo "no second partition in:"; sfdisk -d "$raw"; return 1; }
    mkfs.ext4 -F -q -L root -U "$ROOT_UUID" -E offset=$((start * 512)) -d "$tree" "$raw" "$((size / 2))k"

    # shim as the removable-media loader, the signed GRUB beside it (shim loads
    # grubx64.efi from its own directory) and MokManager in case shim wants it. No
    # fbx64.efi: with it shim would first write a boot entry and reset the VM.
    mkfs.vfat -C -F 32 -n EFI -i "$ESP_VOLID" "$esp" $((ESP_MIB * 1024))
    mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian
    mcopy -i "$esp" "$tree/usr/lib/shim/shimx64.efi.signed" ::/EFI/BOOT/BOOTX64.EFI
    mcopy -i "$esp" "$tree/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" ::/EFI/BOOT/grubx64.efi
    mcopy -i "$esp" "$tree/usr/lib/shim/mmx64.efi.signed" ::/EFI/BOOT/mmx64.efi
    write_grub_cfg "$WORK/grub.cfg"
    mcopy -i "$esp" "$WORK/grub.cfg" ::/EFI/debian/grub.cfg
    mdir -i "$esp" -/ ::/EFI
    dd if="$esp" of="$raw" bs=1M seek=1 conv=notrunc status=none
    rm -f "$esp"

    cmp -n 440 "$raw" /dev/zero || { echo "boot code in the MBR"; return 1; }
    sfdisk -l "$raw"
    qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$raw" "$img"
    rm -f "$raw"
    qemu-img info "$img"
}

make_base_disk() {
    pkglist "$ROOT/var/lib/dpkg" >"$OUT/$DISTRO-base-pkglist.txt"
    : >"$OUT/$DISTRO-base-pkglist-diff.txt"
    make_efi_disk "$ROOT" "$OUT/$DISTRO-base.qcow2"
}

make_layer() {  # make_layer LAYER
    local layer=$1 tree=$WORK/root-$1
    rm -rf "$tree"
    cp -a --reflink=auto "$ROOT" "$tree"
    install_layer_debs "$tree" "$layer"
    layer_pkglists "$tree" "$layer"
    make_efi_disk "$tree" "$OUT/$DISTRO-$layer.qcow2"
    rm -rf "$tree"
    write_provision_script "$layer" "a copy of the base root tree (a whole image, no backing file)"
}

# --bios-twin: the base root tree on an MBR disk booted by extlinux (as the debian12
# set), same kernel command line, for benchmarks of UEFI against BIOS boot of the
# same guest. Lands in the set's cache directory, not in an RPM.
make_bios_twin() {
    make_mbr_disk "$WORK/cache-extra/$DISTRO-base-bios.qcow2" "$(kernel_cmdline)"
}

build_set() {
    step "configuring base rootfs" configure_base
    step "building $DISTRO-base.qcow2 (GPT, ESP with shim + GRUB)" make_base_disk
    if [ "$bios_twin" = 1 ]; then
        step "building $DISTRO-base-bios.qcow2 (BIOS twin, cache only)" make_bios_twin
    fi
    local layer
    for layer in "${LAYERS[@]}"; do
        step "building $DISTRO-$layer.qcow2 (whole image, + ${LAYER_PACKAGES[$layer]})" make_layer "$layer"
    done
}

# After installing: every layer is a whole image, without backing file.
check_installed_layer() {  # check_installed_layer LAYER
    local img=$INSTALL_DIR/$DISTRO-$1.qcow2 backing
    qemu-img info -U "$img" >/dev/null || die "$img: not a readable qcow2"
    backing=$(backing_file "$img")
    [ -z "$backing" ] || die "$img: has a backing file ('$backing')"
}
