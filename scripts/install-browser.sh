#!/usr/bin/env bash
# Install Debian's headless Chromium for the report's browser test (needs root / apt).
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 || { echo "apt-get not found"; exit 1; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
$SUDO apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1
command -v chromium >/dev/null 2>&1
