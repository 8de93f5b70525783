#!/usr/bin/env bash
# Builds p11-kit 0.25.5 (server and client module) into target/p11-kit-0.25.5 for the
# network-HSM tests: SoftHSM2 behind `p11-kit server` on a unix socket, divkey on
# p11-kit-client.so. Debian 12's p11-kit 0.24.1 cannot carry CKM_AES_CMAC over its RPC
# (the client answers CKR_MECHANISM_INVALID); 0.25 can. The source is the Debian 13 orig
# tarball, fetched through apt (signed archive) and pinned by SHA-256 below.
# Prints the install prefix. Idempotent: a finished build is reused.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=0.25.5
sha256=04d0a86450cdb1be018f26af6699857171a188ac6d5b8c90786a60854e1198e5
prefix="$root/target/p11-kit-$version"
work="$root/target/p11-kit-src"

if [ -x "$prefix/bin/p11-kit" ] && [ -n "$(find "$prefix" -name p11-kit-client.so -print -quit)" ]; then
  echo "$prefix"
  exit 0
fi

"$root/softhsm/ensure-softhsm.sh" meson ninja-build pkg-config xz-utils >&2
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
tarball="$work/p11-kit_$version.orig.tar.xz"
if ! echo "$sha256  $tarball" | sha256sum -c --status 2>/dev/null; then
  echo "deb-src http://deb.debian.org/debian trixie main" >"$work/sources.list"
  apt_opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache"
    -o APT::Sandbox::User="$(id -un)")
  apt-get "${apt_opts[@]}" -qq update >&2
  # Only the orig tarball is needed (and checked against the pinned SHA-256); apt's
  # complaints about the other source files are kept for when that fails.
  (cd "$work" && apt-get "${apt_opts[@]}" -qq source --download-only "p11-kit=$version-3" \
    >"$work/apt-source.log" 2>&1) || true
  echo "$sha256  $tarball" | sha256sum -c --status || {
    cat "$work/apt-source.log" >&2
    echo "p11-kit-$version: source tarball missing or wrong checksum" >&2
    exit 1
  }
fi
rm -rf "$work/p11-kit-$version" "$work/build"
tar -C "$work" -xf "$tarball"
meson setup "$work/build" "$work/p11-kit-$version" --prefix="$prefix" \
  -Dtrust_module=disabled -Dlibffi=disabled -Dnls=false -Dsystemd=disabled \
  -Dbash_completion=disabled -Dgtk_doc=false -Dman=false -Dtest=false >&2
ninja -C "$work/build" install >&2
echo "$prefix"
