#!/bin/bash -xe
# Runs as root on each host after boot (OST: vdsm's prerequisites).
echo "setup_host on $(hostname)" >/etc/ost-deployed
