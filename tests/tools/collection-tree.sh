#!/usr/bin/env bash
# usage: collection-tree.sh DEST — copy the collection's files (tracked + untracked, not ignored) into
# DEST/ansible_collections/fleetckpt/xen and print that path. ansible-test needs a real directory there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
dest=$1/ansible_collections/fleetckpt/xen
rm -rf "$dest"; mkdir -p "$dest"
cd "$repo"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] || continue
  mkdir -p "$dest/$(dirname "$f")"; cp -p "$f" "$dest/$f"
done
echo "$dest"
