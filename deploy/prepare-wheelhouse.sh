#!/usr/bin/env bash
# Fill deploy/wheelhouse/ with every wheel the image installs: this project (with its shipped weights)
# and all of its dependencies with the serve extra, torch as the CPU build. The Dockerfile then installs with --no-index,
# so the build needs no package index and no resolver can swap in a multi-GB CUDA torch.
#
#   deploy/prepare-wheelhouse.sh            # PYTHON=python3 TORCH_VERSION=2.13.0 by default
#
# Run it with the Python the image will have (same minor version, 3.11 for Debian bookworm and the
# default python:3.11-slim base) on the same CPU architecture: the wheels are built for it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
out=$here/wheelhouse

rm -rf "$out"
mkdir -p "$out"
# `pip wheel` builds the project's wheel and fetches (or builds) a wheel for every dependency;
# asking for torch==VERSION explicitly picks the CPU build where pip finds one (the host's
# find-links or a CPU index given with PIP_EXTRA_INDEX_URL), as the README's install does.
"$python" -m pip wheel --quiet --wheel-dir "$out" "torch==$torch_version" "$repo[serve]"
# A wheel built in-tree leaves build/ behind; the image needs none of it.
rm -rf "$repo/build"
echo "prepare-wheelhouse: $(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out"
