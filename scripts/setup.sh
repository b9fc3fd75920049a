#!/usr/bin/env bash
# Installs what Hyperfold needs on a Debian 12 host, or says exactly what to run.
# Idempotent: installs only what is missing. Used by `npm start`, `npm test` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

# program -> Debian package
declare -A NEED=(
  [qemu-system-x86_64]=qemu-system-x86
  [qemu-img]=qemu-utils
  [busybox]=busybox-static
  [cpio]=cpio
  [dpkg-deb]=dpkg
  [mke2fs]=e2fsprogs
  [ip]=iproute2
  [bridge]=iproute2
  [dnsmasq]=dnsmasq-base
  [nft]=nftables
  [setpriv]=util-linux
  [runc]=runc
  [skopeo]=skopeo
  [umoci]=umoci
  [debootstrap]=debootstrap
  [nsenter]=util-linux
  [flock]=util-linux
  [curl]=curl
  [etcd]=etcd-server
  [etcdctl]=etcd-client
  [openssl]=openssl
)
missing=()
for prog in "${!NEED[@]}"; do
  command -v "$prog" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$prog" >/dev/null 2>&1 || missing+=("${NEED[$prog]}")
done
# busybox must be the static build (it runs inside the guest's initramfs)
if command -v busybox >/dev/null 2>&1 && ! dpkg -s busybox-static >/dev/null 2>&1; then missing+=(busybox-static); fi
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || missing+=(ovmf)
if [ "${#missing[@]}" -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [ "$(id -u)" -ne 0 ]; then
    echo "hyperfold: missing Debian packages. Run as root:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  echo "hyperfold: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d node_modules ] || [ package.json -nt node_modules/.package-lock.json ]; then
  echo "hyperfold: installing npm packages" >&2
  npm install --no-audit --no-fund --allow-scripts=better-sqlite3 >/dev/null 2>&1 || npm install --no-audit --no-fund
fi
if ! node -e "require('better-sqlite3')" >/dev/null 2>&1; then
  echo "hyperfold: building better-sqlite3" >&2
  npm rebuild better-sqlite3 >/dev/null
fi
npx tsc -p tsconfig.json
