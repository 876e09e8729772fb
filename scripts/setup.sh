#!/usr/bin/env bash
# Sets up everything uballoon needs on a fresh Debian 12 machine; safe to run again.
#  - Debian packages: QEMU and a Linux kernel + busybox for the test VMs, the kernel's
#    virtio headers for the conformance test, a C compiler for the native helper.
#  - a virtualenv in .venv with uballoon installed (editable) and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 linux-image-amd64 busybox-static linux-libc-dev gcc python3-venv)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
echo "== installing uballoon into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
