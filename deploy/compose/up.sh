#!/usr/bin/env bash
# Brings up deploy/compose/compose.yaml on this machine: Garage and two faultline servers with
# TLS and tokens. Makes what the compose file needs on the first run and keeps it afterwards:
#   .env          Garage's RPC secret and the servers' S3 key (id and secret)
#   secrets/      ca.crt (give it to clients), server.crt/.key (names faultline-a,
#                 faultline-b, localhost, 127.0.0.1), tokens (hashes only), client.token
#                 (a read,record,write token on every snapshot, printed once by the server)
# Needs: docker with the compose plugin (or docker-compose), openssl.
#
# `up.sh --secrets-only` makes .env and secrets/ and stops, with the tokens file made by the
# binary in $FAULTLINE_SERVER_BIN instead of the image (scripts/check-deploy.sh runs it so,
# then starts a real server on what it made).
set -euo pipefail
cd "$(dirname "$0")"

secrets_only=false
if [ "${1:-}" = --secrets-only ]; then
    secrets_only=true
elif [ $# -gt 0 ]; then
    echo "usage: up.sh [--secrets-only]" >&2
    exit 2
fi

compose=()
if [ "$secrets_only" = false ]; then
    if docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1; then
        compose=(docker-compose)
    else
        echo "up.sh: neither 'docker compose' nor 'docker-compose' is installed" >&2
        exit 1
    fi
fi
command -v openssl >/dev/null || { echo "up.sh: openssl is needed to make the TLS files" >&2; exit 1; }

umask 077
if [ ! -f .env ]; then
    # Garage's key ids are "GK" and 24 hex digits; secrets 64 hex digits.
    {
        echo "GARAGE_RPC_SECRET=$(openssl rand -hex 32)"
        echo "FAULTLINE_S3_KEY_ID=GK$(openssl rand -hex 12)"
        echo "FAULTLINE_S3_SECRET=$(openssl rand -hex 32)"
    } > .env
    echo "wrote .env"
fi

mkdir -p secrets
if [ ! -f secrets/server.crt ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
        -subj "/CN=faultline compose CA" -keyout secrets/ca.key -out secrets/ca.crt 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=faultline-server" -keyout secrets/server.key -out secrets/server.csr 2>/dev/null
    openssl x509 -req -in secrets/server.csr -CA secrets/ca.crt -CAkey secrets/ca.key \
        -CAcreateserial -days 365 -out secrets/server.crt \
        -extfile <(printf 'subjectAltName=DNS:faultline-a,DNS:faultline-b,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') \
        2>/dev/null
    rm -f secrets/server.csr
    echo "wrote secrets/ca.crt, secrets/server.crt, secrets/server.key"
fi
# The servers run as uid 65532 and read the mounted files: readable, on this machine only.
chmod 0755 secrets
chmod 0644 secrets/ca.crt secrets/server.crt secrets/server.key

if [ "$secrets_only" = false ]; then
    "${compose[@]}" build
fi

if [ ! -f secrets/tokens ]; then
    if [ "$secrets_only" = true ]; then
        "${FAULTLINE_SERVER_BIN:?set FAULTLINE_SERVER_BIN to a faultline-server binary}" \
            token new --tokens secrets/tokens --snapshots '*' --rights read,record,write \
            > secrets/client.token
    else
        "${compose[@]}" run --rm --no-deps --user "$(id -u):$(id -g)" -v "$PWD/secrets:/out" \
            faultline-a token new --tokens /out/tokens --snapshots '*' --rights read,record,write \
            > secrets/client.token
    fi
    chmod 0644 secrets/tokens
    echo "wrote secrets/tokens; the client token is in secrets/client.token (shown once)"
fi
if [ "$secrets_only" = true ]; then
    exit 0
fi

"${compose[@]}" up -d
cat <<MSG

Up: Garage S3 on 127.0.0.1:3900, faultline servers on 127.0.0.1:7071 and 127.0.0.1:7072
(metrics and probes on 127.0.0.1:9101 and :9102). For example:
  curl -fsS http://127.0.0.1:9101/readyz
  faultline restore --server https://localhost:7071 --server https://localhost:7072 \\
      --ca deploy/compose/secrets/ca.crt --token "\$(cat deploy/compose/secrets/client.token)" --snapshot NAME
Stop: make -C deploy compose-down (volumes kept; add -v to drop the snapshots).
MSG
