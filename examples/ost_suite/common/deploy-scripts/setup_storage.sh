#!/bin/bash -xe
# Runs as root on the storage VM after boot: one volume group on the two extra disks
# (OST exports them over NFS and iSCSI). The disks are found by their serial numbers.
disk_with_serial() {
    for dev in /sys/block/sd*; do
        [ "$(cat "$dev/device/vpd_pg80" 2>/dev/null | tr -dc '[:print:]' | tr -d ' ')" = "$1" ] \
            && { echo "/dev/${dev##*/}"; return; }
    done
    lsblk -ndo PATH,SERIAL | awk -v s="$1" '$2 == s { print $1 }'
}
nfs=$(disk_with_serial 2)
iscsi=$(disk_with_serial 3)
pvcreate -q "$nfs" "$iscsi"
vgcreate -q ost_storage "$nfs" "$iscsi"
echo "setup_storage on $(hostname)" >/etc/ost-deployed
