#!/usr/bin/env bash
# Federation operator: start the SuperLink with TLS and SuperNode authentication.
#   deploy/start_superlink.sh CERT_DIR [PORT]
# CERT_DIR holds ca.crt, superlink.crt and superlink.key (deploy/make_certs.py). Then admit each site:
#   flwr supernode register SITE.pub CONNECTION
# with a connection in $FLWR_HOME/config.toml: address = "HOST:PORT", root-certificates = "CERT_DIR/ca.crt".
set -euo pipefail
certs=${1:?usage: start_superlink.sh CERT_DIR [PORT]}
port=${2:-9093}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec flower-superlink \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/superlink.crt" --ssl-keyfile "$certs/superlink.key" \
  --enable-supernode-auth --host 0.0.0.0 --port "$port" \
  --disable-runtime-dependency-installation
