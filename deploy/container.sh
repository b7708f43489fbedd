#!/usr/bin/env bash
# Build the pc-encoder image with podman and prove it: base image, wheelhouse, build, run, check.
#
#   deploy/container.sh build     # base image (if missing) + wheelhouse + image localhost/pc-encoder:0.2.0-cpu
#   deploy/container.sh check     # build, then run the container read-only and check it from outside
#   deploy/container.sh verify    # only run and check an image already built
#   deploy/container.sh base      # only the base image
#   deploy/container.sh image     # print the image's name and tag
#
# Where no base image can be pulled, `base` builds a minimal Debian bookworm (mmdebstrap, from the
# host's apt sources) and imports it as localhost/pc-base:bookworm; set BASE_IMAGE to use another
# (python:3.11-slim-bookworm where a registry is reachable). Needs podman and runc (Debian's
# packages), mmdebstrap for `base`, and `default_ulimits = []` under [containers] in
# /etc/containers/containers.conf (podman's default ulimits cannot be set inside this sandbox).
#
# Settings (environment): IMAGE (localhost/pc-encoder:VERSION-cpu, or -gpu with TORCH=cuda; VERSION is
# pyproject.toml's: docs/DEPLOY.md, "Image tags"), BASE_IMAGE (localhost/pc-base:bookworm),
# TORCH (cpu|cuda), PYTHON (the Python whose pip builds the wheelhouse; python3), PORT (free port for
# `check`; 3000), REBUILD_BASE=1 to rebuild the base image even when it exists.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
torch=${TORCH:-cpu}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/../pyproject.toml" | head -n 1)
[ "$torch" = cuda ] && variant=gpu || variant=cpu
image=${IMAGE:-localhost/pc-encoder:$version-$variant}
base_image=${BASE_IMAGE:-localhost/pc-base:bookworm}
python=${PYTHON:-python3}
port=${PORT:-3000}
podman=(podman --runtime runc)
ca_bundle=/etc/ssl/certs/ca-certificates.crt

log() { echo "container.sh: $*" >&2; }

preflight() {
    command -v podman >/dev/null || { log "podman not found: apt-get install podman runc"; exit 1; }
    command -v runc >/dev/null || [ -x /usr/sbin/runc ] || { log "runc not found: apt-get install runc"; exit 1; }
    if ! grep -Eq '^\s*default_ulimits\s*=\s*\[\s*\]' /etc/containers/containers.conf 2>/dev/null; then
        log "set 'default_ulimits = []' under [containers] in /etc/containers/containers.conf (see docs/DEPLOY.md)"
        exit 1
    fi
}

build_base() {
    if [ "$base_image" != localhost/pc-base:bookworm ]; then
        log "using base image $base_image"
        return
    fi
    if [ -z "${REBUILD_BASE:-}" ] && "${podman[@]}" image exists "$base_image"; then
        log "base image $base_image exists (REBUILD_BASE=1 rebuilds it)"
        return
    fi
    command -v mmdebstrap >/dev/null || { log "mmdebstrap not found: apt-get install mmdebstrap"; exit 1; }
    local sources started=$SECONDS
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # The host's own apt sources, so the base comes from the same mirror the host already uses.
    sources=/etc/apt/sources.list.d/debian.sources
    [ -f "$sources" ] || sources=/etc/apt/sources.list
    log "building $base_image with mmdebstrap (minbase + python3, python3-venv, ca-certificates)"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$work/base.tar" "$sources"
    "${podman[@]}" import --change 'CMD ["/bin/bash"]' "$work/base.tar" "$base_image" >/dev/null
    rm -rf "$work"
    trap - EXIT
    log "base image built in $((SECONDS - started)) s"
}

build_image() {
    local started=$SECONDS
    PYTHON="$python" "$here/prepare-wheelhouse.sh"
    log "wheelhouse ready in $((SECONDS - started)) s"
    log "building $image (TORCH=$torch) on $base_image"
    # --network=host and the host's CA bundle: only the GPU variant reaches the package index (the
    # CPU build installs from the wheelhouse alone). --format docker keeps the HEALTHCHECK.
    # --layers=false: no per-instruction images are committed (a third faster here, and no 1.4 GB
    # build-stage image left behind); every build starts from the base.
    "${podman[@]}" build --format docker --layers=false --network=host \
        -v "$ca_bundle:$ca_bundle:ro" \
        --build-arg "BASE_IMAGE=$base_image" --build-arg "TORCH=$torch" \
        -t "$image" -f "$here/Dockerfile" "$here"
    log "$image built in $((SECONDS - started)) s (wheelhouse included)"
}

check_image() {
    name=pc-encoder-check-$$  # global: the EXIT trap below stops it
    log "running $image as $name on port $port (read-only root filesystem, no capabilities)"
    # BENTOML_HOME on a tmpfs owned by the container's user (podman's chown=true; a tmpfs `mode` is
    # not applied here); --read-only puts a tmpfs on /tmp itself. Without systemd podman cannot
    # schedule the healthcheck timer: it is run once by hand below instead.
    "${podman[@]}" run --detach --rm --name "$name" --network=host \
        --read-only --mount type=tmpfs,destination=/var/lib/bentoml,chown=true \
        --cap-drop=ALL --security-opt=no-new-privileges --health-interval=disable \
        -e "PC_PORT=$port" "$image" >/dev/null
    trap '"${podman[@]}" rm --force --time 10 "$name" >/dev/null 2>&1 || true' EXIT  # stop, and remove now
    "$python" "$here/smoke.py" "http://127.0.0.1:$port" || {
        "${podman[@]}" logs --tail 40 "$name" >&2 || true
        exit 1
    }
    "${podman[@]}" healthcheck run "$name" || { log "the image's HEALTHCHECK failed on a ready container"; exit 1; }
    log "ok: $image serves /readyz, /encode and /metrics, and its HEALTHCHECK passes"
}

case "${1:-}" in
    base) preflight; build_base ;;
    build) preflight; build_base; build_image ;;
    check) preflight; build_base; build_image; check_image ;;
    verify) preflight; check_image ;;
    image) echo "$image" ;;
    *) echo "usage: $0 base|build|check|verify|image" >&2; exit 2 ;;
esac
