#!/usr/bin/env bash
# NVIDIA's perf_analyzer (PyPI: perf-analyzer 2.60.0), the standard load generator for the Open Inference
# Protocol (KServe v2 / Triton HTTP), made to run on this Debian 12 machine: its binary needs glibc 2.38 and
# GCC 13's libstdc++, so it is started through Debian 13's dynamic loader with Debian 13's runtime libraries.
# First call sets up a cache (about 30 MB) from PyPI and Debian's packages; later calls start at once.
# Usage: bench/perf_analyzer_debian12.sh -m MODEL -u 127.0.0.1:8000 -i http [any perf_analyzer option]
# (bench/perf_analyzer.sh uses it when no perf_analyzer is on PATH.) Set PERF_ANALYZER_HOME to move the cache.
set -euo pipefail
home=${PERF_ANALYZER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/perf-analyzer-2.60.0}
lib=$home/root/usr/lib/x86_64-linux-gnu
if [[ ! -x $home/bin/perf_analyzer || ! -e $lib/ld-linux-x86-64.so.2 ]]; then
  echo "perf_analyzer: first use, setting up $home" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  py=$(command -v python3)
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_38_x86_64 -d "$tmp/whl" perf-analyzer==2.60.0 >&2
  mkdir -p "$home/bin" "$tmp/apt/lists/partial" "$tmp/apt/cache/archives/partial" "$tmp/debs"
  (cd "$tmp/whl" && "$py" -m zipfile -e perf_analyzer-*.whl x)
  install -m 755 "$tmp/whl/x/perf_analyzer/bin/perf_analyzer" "$home/bin/perf_analyzer"
  cat > "$tmp/apt/trixie.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  o=(-oDir::Etc::sourcelist="$tmp/apt/trixie.sources" -oDir::Etc::sourceparts=/nonexistent
     -oDir::State::Lists="$tmp/apt/lists" -oDir::Cache="$tmp/apt/cache" -oAPT::Sandbox::User=root)
  apt-get "${o[@]}" -qq update >&2
  (cd "$tmp/debs" && apt-get "${o[@]}" -qq download libc6 libstdc++6 libgcc-s1 libssl3t64 zlib1g >&2)
  for f in "$tmp"/debs/*.deb; do dpkg -x "$f" "$home/root"; done
fi
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$home/bin/perf_analyzer" "$@"
