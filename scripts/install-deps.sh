#!/usr/bin/env bash
# Installs what Berth builds and runs with, from Debian packages, if missing:
# containerd + runc (the runtime), protobuf-compiler (containerd-client's build), busybox-static
# (the test image), skopeo + docker-registry (pull tests), jq, iproute2.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have containerd || need+=(containerd)
have runc || need+=(runc)
have protoc || need+=(protobuf-compiler)
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || need+=(busybox-static)
have skopeo || need+=(skopeo)
have docker-registry || need+=(docker-registry)
have jq || need+=(jq)
have file || need+=(file)
have ip || need+=(iproute2)

if [ ${#need[@]} -gt 0 ]; then
  echo "Installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # The package may start a system containerd; Berth's scripts use their own.
fi

if ! have cargo; then
  echo "cargo is missing: install a Rust toolchain (1.88 or newer), e.g. with rustup." >&2
  exit 1
fi
