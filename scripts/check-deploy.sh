#!/usr/bin/env bash
# Validates deploy/ (run by `make test`): lints the image build files, the Kubernetes
# manifests, the compose file, the shell scripts and the systemd unit with real tools, then
# checks every flag, environment variable and probe path the files use against the binaries
# this workspace builds. See deploy/README.md for what is checked and what cannot run here.
#
# The tools come from PyPI (pinned in deploy/check-requirements.txt) into a virtualenv under
# the cargo target directory; systemd-analyze from the system (Debian's systemd).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
venv="$target/deploy-tools"
requirements=deploy/check-requirements.txt

command -v python3 >/dev/null || {
    echo "check-deploy: python3 is needed (apt-get install python3 python3-venv)" >&2
    exit 1
}
if ! cmp -s "$requirements" "$venv/.requirements" 2>/dev/null; then
    echo "check-deploy: installing the checkers of $requirements into $venv"
    python3 -m venv --clear "$venv" || {
        echo "check-deploy: python3 -m venv failed (apt-get install python3-venv)" >&2
        exit 1
    }
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/.requirements"
fi

cargo build --quiet -p faultline-server --bin faultline-server -p faultline-client --bin faultline

exec "$venv/bin/python" scripts/check-deploy.py --bin-dir "$target/debug" --tools "$venv/bin"
