#!/usr/bin/env bash
# Site operator: start this site's SuperNode and the site runner (fedvlp-site supernode): the SuperNode runs
# with --isolation process, verifies the SuperLink with the federation's CA and authenticates with the site's
# key; the runner, from this installation, starts every ClientApp: it refuses app versions the site YAML
# does not allow (privacy.allowed_fab_hashes, fedvlp-site approve) before extracting them, and filters every
# reply (privacy.egress_log records what left). A restart right after a crash is retried until the
# SuperLink lets the site rejoin.
#   deploy/start_supernode.sh SUPERLINK_HOST:PORT CA_CERT SITE_KEY SITE_YAML [PORT]
set -euo pipefail
superlink=${1:?usage: start_supernode.sh SUPERLINK_HOST:PORT CA_CERT SITE_KEY SITE_YAML [PORT]}
ca=${2:?CA certificate (ca.crt from the operator)}
key=${3:?the private key of this site (deploy/make_site_key.py)}
site_yaml=$(realpath "${4:?the site YAML}")
port=${5:-9094}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec fedvlp-site supernode --config "$site_yaml" -- --superlink "$superlink" --root-certificates "$ca" \
  --auth-supernode-private-key "$key" --host 127.0.0.1 --port "$port" --node-config "site-config=\"$site_yaml\""
