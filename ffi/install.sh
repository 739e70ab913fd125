#!/usr/bin/env bash
# Installs libprobert for C users under a prefix:
#   $PREFIX/include/probert.h
#   $PREFIX/lib/libprobert.so.$VERSION, with the links libprobert.so.$MAJOR
#     (its SONAME) and libprobert.so; $PREFIX/lib/libprobert.a
#   $PREFIX/lib/pkgconfig/probert.pc
#
# Usage (from anywhere; builds the release libraries first):
#   ffi/install.sh [PREFIX]            # default PREFIX: /usr/local
#   DESTDIR=/tmp/stage ffi/install.sh /usr   # staged, for packaging
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${1:-/usr/local}
dest=${DESTDIR:-}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
native_static_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

cargo build --release --locked -p probert-ffi
install -d "$dest$prefix/include" "$dest$prefix/lib/pkgconfig"
install -m 644 include/probert.h "$dest$prefix/include/probert.h"
major=${version%%.*}
install -m 755 target/release/libprobert.so "$dest$prefix/lib/libprobert.so.$version"
ln -sfn "libprobert.so.$version" "$dest$prefix/lib/libprobert.so.$major"
ln -sfn "libprobert.so.$major" "$dest$prefix/lib/libprobert.so"
install -m 644 target/release/libprobert.a "$dest$prefix/lib/libprobert.a"
# --no-as-needed: see ffi/build.rs (the library may precede the sources).
cat >"$dest$prefix/lib/pkgconfig/probert.pc" <<PC
prefix=$prefix
includedir=\${prefix}/include
libdir=\${prefix}/lib

Name: probert
Description: In-process dynamic instrumentation: probes on live code
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,--push-state,--no-as-needed -lprobert -Wl,--pop-state -lpthread -ldl
Libs.private: $native_static_libs
PC
echo "installed probert $version under $dest$prefix"
