#!/usr/bin/env bash
# Build the benchmark's Go helpers (loadgen, echo) into bench/bin/.
#
# Standard library only, GOPATH mode (GO111MODULE=off), no network. Idempotent:
# a binary is rebuilt only when its main.go is newer than it. Needs Debian's
# golang-go (Go 1.19): apt-get install golang-go
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export GO111MODULE=off
export GOPATH="$here/.gopath"
export GOCACHE="$here/.gopath/cache"
export GOFLAGS=
export CGO_ENABLED=0

if ! command -v go >/dev/null 2>&1; then
    echo "bench/build.sh: 'go' not found; install it with: apt-get install golang-go" >&2
    exit 1
fi

mkdir -p "$here/bin" "$GOPATH"
for prog in loadgen echo; do
    src="$here/$prog/main.go"
    out="$here/bin/$prog"
    if [[ -x "$out" && "$out" -nt "$src" && "$out" -nt "$here/build.sh" ]]; then
        continue
    fi
    echo "bench/build.sh: building bin/$prog" >&2
    (cd "$here/$prog" && go build -trimpath -o "$out.tmp" main.go)
    mv -f "$out.tmp" "$out"
done
