#!/usr/bin/env bash
# Obtains ONNX Runtime's C/C++ API headers from Debian's libonnxruntime-dev (>= 1.21) without
# installing anything system-wide: the .deb is downloaded with apt-get and only its headers are
# unpacked into a cache folder. No PyPI wheel ships these headers, and third-party source is never
# committed to this repository.
#
# Usage: scripts/fetch_ort_headers.sh [CACHE_DIR]   (default: .cache/ort-headers)
# Prints the include folder (the one holding onnxruntime_c_api.h) on its last line.
set -euo pipefail

cache=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.cache/ort-headers"}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
include="$cache/include/onnxruntime"

if [ -f "$include/onnxruntime_c_api.h" ]; then
  echo "$include"
  exit 0
fi

die() { echo "fetch_ort_headers: $*" >&2; exit 1; }
command -v apt-get >/dev/null || die "apt-get not found; install ONNX Runtime headers by hand and pass -DONNXRUNTIME_INCLUDE_DIR=<folder>"

# Reuse the Debian mirror this machine is already configured with (so no host is named here).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror=$(awk '/^URIs:/ {print $2; exit}' "$f")
  case "$mirror" in *debian-security*) mirror="";; esac
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt; pass -DONNXRUNTIME_INCLUDE_DIR=<folder> instead"

# The bookworm archive has no libonnxruntime-dev; trixie has 1.21. A private sources list and lists
# folder keep the machine's own apt state untouched.
apt_dir="$cache/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
signed=""
[ -f "$keyring" ] && signed="[signed-by=$keyring]"
echo "deb $signed $mirror trixie main" > "$apt_dir/sources.list"
opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
      -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update >&2 || die "apt-get update for trixie failed"
(cd "$apt_dir" && apt-get "${opts[@]}" -qq download libonnxruntime-dev >&2) || die "apt-get download libonnxruntime-dev failed"
deb=$(ls "$apt_dir"/libonnxruntime-dev_*.deb | head -n 1)

unpack="$cache/unpack"
rm -rf "$unpack"
dpkg-deb -x "$deb" "$unpack"
src=$(dirname "$(find "$unpack" -name onnxruntime_c_api.h | head -n 1)")
[ -f "$src/onnxruntime_c_api.h" ] || die "libonnxruntime-dev holds no onnxruntime_c_api.h"
mkdir -p "$include"
cp "$src"/*.h "$include"/
rm -rf "$unpack" "$apt_dir/archives"
echo "$include"
