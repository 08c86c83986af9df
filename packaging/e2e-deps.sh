#!/bin/bash
# Installs what the end-to-end suite (tests/e2e) needs on a fresh Debian 12 machine:
# debootstrap and systemd-nspawn to build and boot the device root filesystem, and
# the Debian packaging tools that build and check the .deb. Run as root; idempotent.
# The container itself gets mender-client and mender-artifact from the mirror; the
# host only needs mender-artifact (to wrap bundles into .mender artifacts). fuse3 (with
# libfuse3) is for the power-cut tests' FUSE file system (tests/powercut).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "e2e-deps: must run as root (apt-get install)" >&2
    exit 2
fi

packages=(
    debootstrap
    systemd-container
    debhelper
    dh-python
    python3-all
    python3-setuptools
    pybuild-plugin-pyproject
    lintian
    mender-artifact
    fuse3
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "e2e-deps: all present (${packages[*]})"
    exit 0
fi

echo "e2e-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "e2e-deps: done"
