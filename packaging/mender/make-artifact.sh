#!/bin/bash
# Wraps a signed migration bundle (.zmb) into a Mender artifact for the
# "zmonitor-migration" update module.
#
#   packaging/mender/make-artifact.sh BUNDLE.zmb OUT.mender [ARTIFACT_NAME] [DEVICE_TYPE...]
#
# ARTIFACT_NAME defaults to the bundle's file name without .zmb; DEVICE_TYPE to
# zmonitor-bedside (Mender's device type, /var/lib/mender/device_type on the device;
# our own device_types check inside the bundle still applies). Extra arguments in
# MENDER_ARTIFACT_ARGS (e.g. "-k signing.key") are passed to mender-artifact.
set -euo pipefail

if [ "$#" -lt 2 ]; then
    sed -n '5,10p' "$0" >&2
    exit 2
fi
bundle="$1"
out="$2"
name="${3:-$(basename "$bundle" .zmb)}"
shift $(( $# < 3 ? $# : 3 ))
device_types=("$@")
[ "${#device_types[@]}" -gt 0 ] || device_types=(zmonitor-bedside)

[ -f "$bundle" ] || { echo "make-artifact: no such bundle: $bundle" >&2; exit 2; }
command -v mender-artifact >/dev/null || {
    echo "make-artifact: mender-artifact not found (apt-get install mender-artifact)" >&2
    exit 2
}

args=(write module-image -T zmonitor-migration -n "$name" -o "$out" -f "$bundle")
for t in "${device_types[@]}"; do
    args+=(-t "$t")
done
# shellcheck disable=SC2206  # word splitting of the extra arguments is intended
extra=(${MENDER_ARTIFACT_ARGS:-})
mender-artifact "${args[@]}" "${extra[@]}"
echo "make-artifact: wrote $out (name $name, device types ${device_types[*]})"
