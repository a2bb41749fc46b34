#!/usr/bin/env bash
# Installs a newer Nix (Debian 13 "trixie"'s nix-bin, Nix 2.26: worker protocol 1.38) beside the
# system's Nix 2.8, for the tests that run newer clients and the newer nix-daemon. Nothing is
# installed system-wide and the host's /nix is never touched: the packages are unpacked under
# PREFIX and run through their own dynamic loader (they need a newer glibc than Debian 12's), by
# wrappers in PREFIX/bin (nix, nix-store, nix-build, nix-daemon, ...).
#
#   scripts/newer-nix.sh [PREFIX]     # PREFIX: $STOCKADE_NEWER_NIX, else /opt/stockade-newer-nix
#   PREFIX/bin/nix-store --version
#
# The tests find it at the same place (tests/src/newer.rs reads STOCKADE_NEWER_NIX too).
# Uses the Debian archive this machine's apt already uses (only that network access is needed),
# through a private apt configuration under PREFIX/apt. Idempotent: when PREFIX holds a
# complete installation it only rewrites the wrappers. Needs root only to write PREFIX.
# Environment: NEWER_NIX_SUITE (default trixie), NEWER_NIX_VERSION (the upstream version the
# installed one must start with, default 2.26.; empty accepts any).
set -euo pipefail
PREFIX=${1:-${STOCKADE_NEWER_NIX:-/opt/stockade-newer-nix}}
SUITE=${NEWER_NIX_SUITE:-trixie}
WANT=${NEWER_NIX_VERSION-2.26.}
case $PREFIX in /*) ;; *) echo "newer-nix: PREFIX must be absolute: $PREFIX" >&2; exit 1 ;; esac
case $PREFIX/ in /nix/*) echo "newer-nix: refusing to install under /nix" >&2; exit 1 ;; esac

if [ ! -e "$PREFIX/.complete" ]; then
  for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "newer-nix: $tool is missing (Debian needed)" >&2; exit 1; }
  done
  # Built beside PREFIX, then renamed into place: an interrupted run leaves no half installation.
  stage=$PREFIX.partial
  rm -rf "$stage"
  T=$stage/apt
  mkdir -p "$T/lists/partial" "$T/cache/archives/partial" "$stage/debs" "$stage/root" "$stage/bin"
  # apt drops to the _apt user for downloads when it can.
  chown -R _apt "$T" "$stage/debs" 2>/dev/null || true
  # The archive's address, as this machine's apt sources name it.
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)
  [ -n "$uri" ] || { echo "newer-nix: no Debian archive found in /etc/apt sources" >&2; exit 1; }
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $SUITE main" >"$T/sources.list"
  : >"$T/status"
  A=(-o Dir::Etc::SourceList="$T/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$T/lists" -o Dir::State::status="$T/status" -o Dir::Cache="$T/cache"
     -o Debug::NoLocking=1)
  echo "newer-nix: fetching nix-bin from $uri $SUITE into $PREFIX"
  apt-get "${A[@]}" update >"$stage/apt.log" 2>&1 || { cat "$stage/apt.log" >&2; exit 1; }
  version=$(apt-cache "${A[@]}" show nix-bin | awk '/^Version:/{print $2; exit}')
  case ${version#*:} in
    "$WANT"*) ;;
    *) echo "newer-nix: $SUITE has nix-bin $version, not ${WANT}x (set NEWER_NIX_VERSION= to accept it)" >&2; exit 1 ;;
  esac
  # nix-bin is one multi-call binary; bring its library dependencies' whole closure (not the
  # Perl bindings and the programs it calls, which the tests do not use).
  roots=$(apt-cache "${A[@]}" depends nix-bin | awk '/^ *\|?Depends: /{print $2}' | grep -E '^lib' | grep -v -- '-perl$')
  pkgs=$(apt-cache "${A[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
           --no-breaks --no-replaces --no-enhances $roots | grep -v '^[ <]' | sort -u)
  (cd "$stage/debs" && apt-get "${A[@]}" download nix-bin $pkgs >>"$stage/apt.log" 2>&1) \
    || { cat "$stage/apt.log" >&2; exit 1; }
  for f in "$stage"/debs/*.deb; do dpkg-deb -x "$f" "$stage/root"; done
  # The suite is /usr-merged; base-files, not unpacked here, makes these links.
  [ -e "$stage/root/lib64" ] || ln -s usr/lib64 "$stage/root/lib64"
  [ -e "$stage/root/lib" ] || ln -s usr/lib "$stage/root/lib"
  rm -rf "$stage/debs" "$stage/apt"
  echo "$version" >"$stage/.complete"
  rm -rf "$PREFIX"
  mv "$stage" "$PREFIX"
fi

L=$PREFIX/root/usr/lib/x86_64-linux-gnu
mkdir -p "$PREFIX/bin"
# The binary picks its personality from argv[0]; NIX_BIN_DIR makes it call itself (build hook,
# nix-daemon --stdio) rather than the system's Nix 2.8.
for n in nix nix-store nix-build nix-instantiate nix-daemon nix-env nix-hash nix-shell \
         nix-copy-closure nix-collect-garbage nix-prefetch-url nix-channel; do
  cat >"$PREFIX/bin/$n.new" <<W
#!/bin/sh
export NIX_BIN_DIR=$PREFIX/bin
exec $L/ld-linux-x86-64.so.2 --library-path $L --argv0 $n $PREFIX/root/usr/bin/nix "\$@"
W
  chmod 755 "$PREFIX/bin/$n.new"
  mv "$PREFIX/bin/$n.new" "$PREFIX/bin/$n"
done
"$PREFIX/bin/nix" --version
