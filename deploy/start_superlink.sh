#!/usr/bin/env bash
# Federation operator: start the SuperLink (TLS, SuperNode authentication, state in a database file) and the
# Fleet gateway, the only port the sites reach.
#   deploy/start_superlink.sh CERT_DIR [PORT] [STATE_DIR]
# CERT_DIR holds ca.crt, superlink.crt and superlink.key (deploy/make_certs.py).
# PORT (9093, all interfaces): the Fleet gateway (fedvlp-server fleet-gateway): the Fleet API only.
# The SuperLink itself (Fleet, Control and Runtime APIs on one port, Flower 1.41) listens on
# $FEDVLP_SUPERLINK_HOST:$FEDVLP_SUPERLINK_PORT (127.0.0.1:9092): `flwr run`, `flwr supernode register`, ...
# reach it there, from this machine (or through an SSH tunnel). STATE_DIR (./superlink-state) keeps the
# SuperLink's database: registered sites and runs survive a restart. Then admit each site:
#   flwr supernode register SITE.pub CONNECTION
# with a connection in $FLWR_HOME/config.toml: address = "127.0.0.1:9092", root-certificates = "CERT_DIR/ca.crt".
set -euo pipefail
certs=${1:?usage: start_superlink.sh CERT_DIR [PORT] [STATE_DIR]}
port=${2:-9093}
state=${3:-superlink-state}
host=${FEDVLP_SUPERLINK_HOST:-127.0.0.1}
internal=${FEDVLP_SUPERLINK_PORT:-9092}
mkdir -p "$state"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
# flower-superlink with these arguments, its message objects kept in memory (server/superlink.py)
fedvlp-server superlink -- \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/superlink.crt" --ssl-keyfile "$certs/superlink.key" \
  --enable-supernode-auth --host "$host" --port "$internal" --database "$state/superlink.db" \
  --disable-runtime-dependency-installation &
superlink=$!
fedvlp-server fleet-gateway --listen "0.0.0.0:$port" --superlink "127.0.0.1:$internal" --certs "$certs" &
gateway=$!
# one stops: stop the other (the container or the init system restarts both)
trap 'kill -TERM "$superlink" "$gateway" 2>/dev/null || true' TERM INT
status=0
wait -n "$superlink" "$gateway" || status=$?
kill -TERM "$superlink" "$gateway" 2>/dev/null || true
wait || true
exit "$status"
