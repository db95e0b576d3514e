#!/usr/bin/env bash
# Debian packages the test suite drives as real peers (dig, haproxy, unbound, ...).
# Installs only what is missing, so a second run is instant.
set -euo pipefail
need=()
command -v dig >/dev/null || need+=(bind9-dnsutils)
command -v haproxy >/dev/null || need+=(haproxy)
command -v unbound >/dev/null || need+=(unbound)
[ -x /usr/bin/chromium ] || need+=(chromium)  # status page browser test (Playwright drives it)
command -v bird >/dev/null || need+=(bird2)   # anycast test: the BGP peer ExaBGP announces to
[ -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] || need+=(libb64-0d)  # perf_analyzer's one system library
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${need[*]} (run as root or: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
