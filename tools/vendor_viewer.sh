#!/usr/bin/env bash
# Vendor the report's 3D viewer library (three.js) from the npm registry into vendor/three/
# (git-ignored; never committed). test.py --report copies it next to index.html.
#
#   tools/vendor_viewer.sh            # needs npm (node >= 18) and the registry
#
# three@0.149.0 is pinned: the last release whose build/three.min.js is a classic script without
# a deprecation warning. A classic script loads from a page opened as file:// (ES modules do not:
# browsers refuse module scripts from file:// URLs), so the report works without a web server.
set -euo pipefail
VERSION=0.149.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/vendor/three"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
command -v npm >/dev/null || { echo "error: npm not found; install Node.js 18+ (it brings npm)" >&2; exit 1; }
(cd "$TMP" && npm pack --silent "three@$VERSION" >/dev/null)
tar -xzf "$TMP/three-$VERSION.tgz" -C "$TMP" package/build/three.min.js package/LICENSE package/package.json
mkdir -p "$DEST"
cp "$TMP/package/build/three.min.js" "$DEST/three.min.js"
cp "$TMP/package/LICENSE" "$DEST/LICENSE"
echo "$VERSION" > "$DEST/VERSION"
echo "three.js $VERSION (MIT, $DEST/LICENSE) in $DEST"
