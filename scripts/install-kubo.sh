#!/usr/bin/env bash
# Build the pinned Kubo `ipfs` binary from the Go module proxy and cache it.
#
# `go install github.com/ipfs/kubo/cmd/ipfs@VERSION` is refused because Kubo's go.mod carries
# replace/exclude directives, so the build happens in a throwaway wrapper module that requires
# Kubo and copies those directives (they only take effect in the main module).
# Rebuilds only when the pinned version changes. Prints the binary's path.
set -euo pipefail

KUBO_VERSION="${KUBO_VERSION:-v0.43.1}"
LIBP2P_VERSION="${LIBP2P_VERSION:-v0.50.0}"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/ipfs-execute/kubo"
binary="$cache_root/$KUBO_VERSION/ipfs"

if [[ -x "$binary" ]] && "$binary" version --number >/dev/null 2>&1; then
    echo "$binary"
    exit 0
fi

# Go's official tarball installs to /usr/local/go, which a non-login shell may not have on PATH.
command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "install-kubo: Go is needed to build Kubo (go1.25+)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "install-kubo: building Kubo $KUBO_VERSION (a few minutes the first time)" >&2
go mod init local.invalid/kubo-build >/dev/null 2>&1
go get "github.com/ipfs/kubo/cmd/ipfs@$KUBO_VERSION" >&2
kubo_dir="$(go list -m -f '{{.Dir}}' github.com/ipfs/kubo)"
# Copy Kubo's exclude directives into the wrapper module (they only apply in the main module).
go mod edit -json "$kubo_dir/go.mod" | python3 -c '
import json, sys
for e in json.load(sys.stdin).get("Exclude") or []:
    print("-exclude=" + e["Path"] + "@" + e["Version"])
' | xargs -r go mod edit
# Kubo v0.43.1 also replaces go-libp2p with an unpublished commit that moves it to quic-go v0.62
# and webtransport-go v0.13; the go-libp2p release that requires exactly those is v0.50.0.
go get "github.com/libp2p/go-libp2p@$LIBP2P_VERSION" >&2
mkdir -p "$(dirname "$binary")"
CGO_ENABLED=0 go build -trimpath -o "$binary.tmp" github.com/ipfs/kubo/cmd/ipfs >&2
mv "$binary.tmp" "$binary"
echo "$binary"
