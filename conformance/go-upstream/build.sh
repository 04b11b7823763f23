#!/usr/bin/env bash
# Build the reference Go upstream worker: conformance/go-upstream/bin/go-upstream
#
# Offline, Debian packages only (no module proxy): Go in GOPATH mode, with
# library sources from /usr/share/gocode/src. Installs missing Debian packages
# (needs root or sudo), regenerates the Go stubs from proto/upstream.proto into
# .gopath/, and rebuilds only when a .go source, the proto or this script is
# newer than the binary. Prints one line on stdout saying what it did; tool
# noise goes to stderr. Works from any cwd.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PROTO="$ROOT/proto/upstream.proto"
GP="$HERE/.gopath"                                   # gitignored
BIN="$HERE/bin/go-upstream"                          # gitignored
GEN="$GP/src/pplex/conformance/upstreampb"           # go_package in the proto

# golang-google-grpc-dev pulls in x/net, x/sys, genproto, golang/protobuf.
PKGS=(golang-go protobuf-compiler libprotobuf-dev protoc-gen-go protoc-gen-go-grpc
      golang-google-grpc-dev golang-google-protobuf-dev)

say() { printf 'go-upstream build: %s\n' "$*"; }
log() { printf 'go-upstream build: %s\n' "$*" >&2; }

mkdir -p "$GP" "$HERE/bin"

# One build at a time (e.g. parallel test workers all calling this script).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$GP/.lock"
    flock 9
fi

# --- up to date? --------------------------------------------------------------
sources=("$HERE"/*.go "$PROTO" "$HERE/build.sh")
if [[ -x "$BIN" ]]; then
    stale=""
    for f in "${sources[@]}"; do
        if [[ "$f" -nt "$BIN" ]]; then stale="$f"; break; fi
    done
    if [[ -z "$stale" ]]; then
        say "up to date: $BIN"
        exit 0
    fi
fi

start_ms=$(( $(date +%s%N) / 1000000 ))

# --- Debian packages ----------------------------------------------------------
missing=()
for p in "${PKGS[@]}"; do
    st="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
    [[ "$st" == "install ok installed" ]] || missing+=("$p")
done
installed="none"
if ((${#missing[@]})); then
    SUDO=()
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo -n)
        else
            log "missing Debian packages: ${missing[*]} (run as root, or install them)"
            exit 1
        fi
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >&2
    installed="${missing[*]}"
fi

# --- Go stubs from the proto --------------------------------------------------
if [[ ! -f "$GEN/upstream.pb.go" || ! -f "$GEN/upstream_grpc.pb.go" \
      || "$PROTO" -nt "$GEN/upstream.pb.go" || "$HERE/build.sh" -nt "$GEN/upstream.pb.go" ]]; then
    tmp="$(mktemp -d "$GP/gen.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    incs=(-I "$ROOT/proto")
    # well-known types (google/protobuf/empty.proto), from libprotobuf-dev
    [[ -f /usr/include/google/protobuf/empty.proto ]] && incs+=(-I /usr/include)
    protoc "${incs[@]}" --go_out="$tmp" --go-grpc_out="$tmp" "$PROTO"
    mkdir -p "$GEN"
    mv -f "$tmp"/pplex/conformance/upstreampb/*.go "$GEN"/
    rm -rf "$tmp"
    trap - EXIT
fi

# --- compile ------------------------------------------------------------------
export GO111MODULE=off
export GOPATH="$GP:/usr/share/gocode"
export GOCACHE="$GP/cache"     # private: no HOME needed, rm -rf .gopath = clean
export GOFLAGS=""              # ignore a caller's -mod=... etc. (module-only flags)
export CGO_ENABLED=0           # static binary, no C compiler needed
cd "$HERE"
go build -trimpath -o "$BIN.tmp" .
mv -f "$BIN.tmp" "$BIN"

ms=$(( $(date +%s%N) / 1000000 - start_ms ))
say "built $BIN in $((ms / 1000)).$(( (ms % 1000) / 100 ))s (installed packages: $installed)"
