#!/bin/bash -xe
# Runs as root on the engine after boot (OST: engine-setup's prerequisites).
echo "setup_engine on $(hostname)" >/etc/ost-deployed
