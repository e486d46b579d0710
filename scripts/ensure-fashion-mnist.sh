#!/usr/bin/env bash
# Make sure real Fashion-MNIST is on disk: Debian's dataset-fashion-mnist package puts its four IDX files
# in /usr/share/datasets/fashion-mnist. Installs it when apt is usable; otherwise says what to install.
# With --optional a failure is only reported (the tests that need it are then skipped, saying why).
set -u
dir=/usr/share/datasets/fashion-mnist
[ -f "$dir/train-images-idx3-ubyte.gz" ] && exit 0

as_root=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && as_root="sudo -n"
if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$as_root" ]; }; then
  echo "installing Debian's dataset-fashion-mnist (real Fashion-MNIST, about 30 MB)"
  $as_root apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    { $as_root apt-get update -q >/dev/null 2>&1 && $as_root apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }
fi
[ -f "$dir/train-images-idx3-ubyte.gz" ] && exit 0

echo "Fashion-MNIST is not installed and could not be installed here." >&2
echo "  Install it with: sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu)" >&2
echo "  or put the four IDX .gz files from https://github.com/zalandoresearch/fashion-mnist in a folder" >&2
echo "  and pass --set data.root=FOLDER to the quickstart recipes." >&2
[ "${1:-}" = "--optional" ] && exit 0
exit 1
