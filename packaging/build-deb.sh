#!/bin/bash
# Builds the zmonitor-migrated .deb from this checkout into packaging/build/.
#
#   packaging/build-deb.sh [--lintian]
#
# Works on an out-of-tree copy (packaging/build/src) of the files git knows about
# (tracked plus untracked-but-not-ignored), so the checkout stays clean. Needs
# debhelper, dh-python, pybuild-plugin-pyproject, python3-all (packaging/e2e-deps.sh).
# Prints the path of the .deb on the last line of stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="$here/build"
run_lintian=0
[ "${1:-}" = "--lintian" ] && run_lintian=1

version="$(dpkg-parsechangelog -l "$here/debian/changelog" -S Version)"
py_version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/pyproject.toml" | head -n1)"
if [ "$version" != "$py_version" ]; then
    echo "build-deb: debian/changelog says $version but pyproject.toml says $py_version;" \
         "add a changelog entry (dch -v $py_version)" >&2
    exit 2
fi

src="$out/src/zmonitor-migrated-$version"
rm -rf "$out/src"
mkdir -p "$src"
(
    cd "$repo"
    git ls-files -z --cached --others --exclude-standard \
        | grep -zv -e '^packaging/debian/' -e '^tests/' -e '^bench/' \
        | while IFS= read -r -d '' f; do
            [ -e "$f" ] && printf '%s\0' "$f"
        done \
        | tar --null --no-recursion -T - -cf - \
        | tar -xf - -C "$src"
)
cp -a "$here/debian" "$src/debian"

(
    cd "$src"
    # Debian's own python3 and tools, never a pyenv/virtualenv one earlier in PATH.
    env -u PYTHONPATH -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        DEB_BUILD_OPTIONS="nocheck ${DEB_BUILD_OPTIONS:-}" \
        dpkg-buildpackage -us -uc -b --no-pre-clean >"$out/build.log" 2>&1 \
        || { tail -n 40 "$out/build.log" >&2; echo "build-deb: failed, see $out/build.log" >&2; exit 1; }
)
deb="$out/zmonitor-migrated_${version}_all.deb"
mv -f "$out/src/zmonitor-migrated_${version}_all.deb" "$deb"
rm -f "$out"/src/*.buildinfo "$out"/src/*.changes

if [ "$run_lintian" -eq 1 ]; then
    lintian --info --display-info "$deb" | tee "$out/lintian.txt" >&2 || true
    if grep -q '^E: ' "$out/lintian.txt"; then
        echo "build-deb: lintian reported errors" >&2
        exit 1
    fi
fi
echo "$deb"
