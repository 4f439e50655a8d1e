#!/usr/bin/env bash
# Builds the Go programs the tests need from the Go module proxy, into a cache directory.
# No registry ships kube-apiserver, so we build it the way envtest-style setups do:
# a wrapper module that maps k8s.io/kubernetes's ./staging replaces to published tags.
#
#   build-go-tools.sh k8s         VERSION OUTDIR -> OUTDIR/{kube-apiserver,kubectl,kubelet,
#                                     kube-proxy,kube-scheduler,kube-controller-manager}
#   build-go-tools.sh etcd   VERSION OUTDIR   -> OUTDIR/etcd
#   build-go-tools.sh helm   VERSION OUTDIR   -> OUTDIR/helm
#   build-go-tools.sh wggo   VERSION OUTDIR   -> OUTDIR/wireguard-go
#
# Writes into a temporary directory and moves the binaries into place last, so an
# interrupted build never leaves a half-written cache entry.
set -euo pipefail
what=$1 version=$2 out=$3
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
work=$(mktemp -d "${TMPDIR:-/tmp}/wgmesh-gobuild.XXXXXX")
# Held (by this shell and the go commands it starts) until the build ends, however it ends:
# the test harness removes unlocked wgmesh-gobuild.* directories left by killed builds
# (tests/e2e/src/scratch.rs).
exec 9>"$work/.owner.lock"
flock 9
# The module and build caches live in the work directory and go with it: they hold about
# 4 GB after the Kubernetes build, for 240 MB of binaries that are cached themselves.
# Go makes module files read-only, hence the chmod before removal.
export GOMODCACHE=$work/gomodcache GOCACHE=$work/gocache
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
say() { echo "[build-go-tools] $*" >&2; }
# A line every 30 s while a long step runs (the Kubernetes build is silent for many minutes):
# the time spent and how many packages the Go build cache holds so far.
ticker() {
  local start=$SECONDS
  while sleep 30; do
    local n
    n=$(find "$GOCACHE" -name '*-d' 2>/dev/null | wc -l)
    say "... $1: $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s, $n build outputs cached"
  done
}
# Runs "$@" with the ticker going.
with_ticker() {
  local what=$1; shift
  ticker "$what" &
  local tick=$!
  local rc=0
  "$@" || rc=$?
  kill "$tick" 2>/dev/null; wait "$tick" 2>/dev/null || true
  return "$rc"
}

case "$what" in
k8s)
  printf 'module local/kbins\n\ngo 1.24.0\n\ngodebug default=go1.24\n' > go.mod
  say "resolving k8s.io/kubernetes v$version"
  gomod=$(go mod download -json "k8s.io/kubernetes@v$version" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  [ -n "$gomod" ] || { say "cannot download k8s.io/kubernetes@v$version"; exit 1; }
  minor_patch=${version#1.}
  for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
    go mod edit "-replace=$m=$m@v0.$minor_patch"
  done
  # The control plane and kubectl, which every end-to-end test needs, and what the real
  # cluster's nodes and controllers run: one build, so the six share their compiled
  # packages (22 minutes cold on 2 cores, against about 12 for the first two alone).
  cmds="kube-apiserver kubectl kubelet kube-proxy kube-scheduler kube-controller-manager"
  say "downloading modules (about 1 GB on a cold cache)"
  # shellcheck disable=SC2046
  with_ticker downloading go get $(for c in $cmds; do echo "k8s.io/kubernetes/cmd/$c@v$version"; done)
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=v$version -X $p.gitMajor=1 -X $p.gitMinor=$(cut -d. -f2 <<<"$version")"
  done
  say "compiling $cmds (10-20 minutes on 2 cores when cold)"
  mkdir -p bin
  # shellcheck disable=SC2046
  with_ticker compiling go build -trimpath -pgo=off -tags selinux,notest,grpcnotrace -ldflags "$ld" -o bin/ \
    $(for c in $cmds; do echo "k8s.io/kubernetes/cmd/$c"; done)
  ;;
etcd)
  go mod init local/etcdbin >/dev/null 2>&1
  say "downloading etcd v$version"
  go get "go.etcd.io/etcd/server/v3@v$version"
  say "compiling etcd"
  mkdir -p bin
  go build -trimpath -ldflags "-s -w" -o bin/etcd go.etcd.io/etcd/server/v3
  ;;
helm)
  go mod init local/helmbin >/dev/null 2>&1
  say "downloading helm v$version"
  go get "helm.sh/helm/v3/cmd/helm@v$version"
  say "compiling helm"
  mkdir -p bin
  go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$version" -o bin/helm helm.sh/helm/v3/cmd/helm
  ;;
wggo)
  go mod init local/wggobin >/dev/null 2>&1
  # VERSION without the leading v, like the others. Upstream's tags (0.0.YYYYMMDD) are not
  # semver, so the proxy has pseudo-versions only: `go list -m golang.zx2c4.com/wireguard@latest`.
  say "downloading golang.zx2c4.com/wireguard v$version"
  go get "golang.zx2c4.com/wireguard@v$version"
  say "compiling wireguard-go"
  mkdir -p bin
  go build -trimpath -ldflags "-s -w" -o bin/wireguard-go golang.zx2c4.com/wireguard
  ;;
*) say "unknown tool $what"; exit 2 ;;
esac

mkdir -p "$out"
for b in bin/*; do mv -f "$b" "$out/"; done
say "done: $(ls "$out" | tr '\n' ' ')"
