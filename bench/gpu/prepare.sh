#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (bench/gpu/wheels.txt) for CPython 3.12 on x86_64
# Linux into bench/gpu/wheels/ (git-ignored), to travel with the work tree to a machine with no
# network. Run here, where PyPI is reachable; then on the GPU machine: bash bench/gpu/run.sh --out DIR
#
# Usage: bash bench/gpu/prepare.sh [--force]      (env PYTHON: the pip to use, default python3)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${HERE}/wheels"
PYTHON="${PYTHON:-python3}"
LIMIT_MIB=64

[ "${1:-}" = "--force" ] && rm -rf "${DEST}"
mkdir -p "${DEST}"
mapfile -t SPECS < <(sed -e 's/#.*//' "${HERE}/wheels.txt" | awk 'NF {print $1}')
for spec in "${SPECS[@]}"; do
    name="${spec%%==*}"; version="${spec##*==}"
    # wheel file names use underscores and may differ in case
    pattern="$(echo "${name}" | tr '-' '_')-${version}-"
    if ls "${DEST}" 2>/dev/null | grep -qi "^${pattern}"; then
        continue
    fi
    "${PYTHON}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
        -d "${DEST}" "${spec}"
done
# Nothing else may sit in the folder (an old version would be installed too).
expected=$(for spec in "${SPECS[@]}"; do echo "$(echo "${spec%%==*}" | tr '-' '_')-${spec##*==}" | tr 'A-Z' 'a-z'; done)
for wheel in "${DEST}"/*.whl; do
    base="$(basename "${wheel}" | tr 'A-Z' 'a-z')"
    stem="$(echo "${base}" | cut -d- -f1-2)"
    echo "${expected}" | grep -qx "${stem}" || { echo "[prepare] removing ${base}: not in wheels.txt"; rm -f "${wheel}"; }
done
count=$(ls "${DEST}"/*.whl | wc -l)
size_kib=$(du -sk "${DEST}" | cut -f1)
echo "[prepare] ${count} wheels, $((size_kib / 1024)) MiB in ${DEST}"
[ "${count}" -eq "${#SPECS[@]}" ] || { echo "[prepare] ERROR: expected ${#SPECS[@]} wheels" >&2; exit 1; }
[ "${size_kib}" -lt $((LIMIT_MIB * 1024)) ] || { echo "[prepare] ERROR: over ${LIMIT_MIB} MiB" >&2; exit 1; }
