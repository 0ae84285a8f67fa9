#!/usr/bin/env bash
# The GPU suite in one command, on a machine with no network: install the wheels prepare.sh
# downloaded (bench/gpu/wheels/) into a temporary site directory, then run bench/gpu/suite.py.
#
#   bash bench/gpu/run.sh --out /tmp/gpu_results          # full suite (< 8 min)
#   bash bench/gpu/run.sh --quick --out /tmp/gpu_results  # < 4 min
#   bash bench/gpu/run.sh --dry-run                       # check the wheel set imports, print the plan
#
# Env: PYTHON, the interpreter with the machine's CUDA torch (default python3); SITE, where the wheels
# go (default a fresh temporary directory, removed at exit).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${HERE}/wheels"

if ! ls "${WHEELS}"/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in ${WHEELS}; run 'bash bench/gpu/prepare.sh' on a machine with network first" >&2
    exit 2
fi
if [ -z "${SITE:-}" ]; then
    SITE="$(mktemp -d /tmp/gpu_suite_site.XXXXXX)"
    trap 'rm -rf "${SITE}"' EXIT
fi
PIP_FLAGS=(-q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check --target "${SITE}")
if "${PYTHON}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    "${PYTHON}" -m pip install "${PIP_FLAGS[@]}" "${WHEELS}"/*.whl
else
    # Not the GPU machine's Python (a dry run here): lay the cp312 wheels out all the same.
    "${PYTHON}" -m pip install "${PIP_FLAGS[@]}" --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any "${WHEELS}"/*.whl
fi
export PYTHONPATH="${SITE}:${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
cd "${ROOT}"
"${PYTHON}" "${HERE}/suite.py" --site "${SITE}" "$@"
