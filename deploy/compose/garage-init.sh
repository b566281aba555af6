#!/bin/sh
# One-shot setup of the compose file's Garage node: a layout with this one node, the access
# key of the faultline servers (imported: its id and secret come from .env), the bucket, and
# the key's rights on it. Idempotent: a second `up` finds everything in place.
set -eu

: "${AWS_ACCESS_KEY_ID:?AWS_ACCESS_KEY_ID is not set: run deploy/compose/up.sh, which writes .env}"
: "${AWS_SECRET_ACCESS_KEY:?AWS_SECRET_ACCESS_KEY is not set: run deploy/compose/up.sh}"
BUCKET="${FAULTLINE_BUCKET:-faultline}"
KEY_NAME=faultline
# Bounded wait for the daemon: 60 tries, one second apart.
TRIES=60

g() { garage -c /etc/garage.toml "$@"; }

i=0
until g status >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -ge "$TRIES" ]; then
        echo "garage-init: Garage did not answer on garage:3901 within $TRIES s; see 'docker compose logs garage'" >&2
        exit 1
    fi
    sleep 1
done

node=$(g node id -q | cut -d@ -f1)
if g status | grep -q "NO ROLE ASSIGNED"; then
    g layout assign -z dc1 -c 1G "$node"
    g layout apply --version 1
fi
g key info "$KEY_NAME" >/dev/null 2>&1 \
    || g key import --yes -n "$KEY_NAME" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
g bucket info "$BUCKET" >/dev/null 2>&1 || g bucket create "$BUCKET"
g bucket allow --read --write --owner "$BUCKET" --key "$KEY_NAME"
echo "garage-init: bucket $BUCKET ready for key $KEY_NAME"
