#!/usr/bin/env bash
# Site operator: start this site's SuperNode, verifying the SuperLink with the federation's CA and
# authenticating with the site's key. A restart right after a crash is retried until the SuperLink lets
# the site rejoin (fedvlp-site supernode).
#   deploy/start_supernode.sh SUPERLINK_HOST:PORT CA_CERT SITE_KEY SITE_YAML [PORT]
set -euo pipefail
superlink=${1:?usage: start_supernode.sh SUPERLINK_HOST:PORT CA_CERT SITE_KEY SITE_YAML [PORT]}
ca=${2:?CA certificate (ca.crt from the operator)}
key=${3:?the private key of this site (deploy/make_site_key.py)}
site_yaml=$(realpath "${4:?the site YAML}")
port=${5:-9094}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec fedvlp-site supernode -- --superlink "$superlink" --root-certificates "$ca" --auth-supernode-private-key "$key" \
  --port "$port" --node-config "site-config=\"$site_yaml\""
