#!/bin/bash
# Builds kube-proxy of an old Kubernetes release into target/kube-old/<version>/bin/kube-proxy, for the
# measurement in docs/real-kubernetes.md ("Older kube-proxy releases"). Not part of `cargo xtask test`.
# Scratch module at target/kube-old/<version>/src: requires k8s.io/kubernetes <version>, replaces each
# staging module (the ones upstream's go.mod points at ./staging) with its published v0.X.Y, and copies
# upstream's other replace pins so the dependency set is the release's own.
# Usage: bash tools/repro/build-old-kube-proxy.sh v1.23.17   (caches: target/kube-old/gopath, gocache)
set -euo pipefail
V=${1:?version like v1.23.17}
H=$(cd "$(dirname "$0")/../.." && pwd)/target/kube-old
mkdir -p "$H"
export GOPATH=$H/gopath GOMODCACHE=$H/gopath/pkg/mod GOCACHE=$H/gocache GOFLAGS="-mod=mod -modcacherw ${EXTRA_GOFLAGS:-}" CGO_ENABLED=0
S=v0.$(echo $V | cut -d. -f2).$(echo $V | cut -d. -f3)
mkdir -p $H/$V/src $H/$V/bin; cd $H/$V/src
rm -f go.mod go.sum; (cd /tmp && go mod download k8s.io/kubernetes@$V)
UP=$GOMODCACHE/k8s.io/kubernetes@$V/go.mod
{
  printf 'module lab/kube-proxy-old\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' $V
  sed -n '/^replace (/,/^)/p' $UP | grep '=>' | sed 's#//.*##' | while read -r m _ tgt ver; do
    if [ "$tgt" = "./staging/src/$m" ]; then printf '\t%s => %s %s\n' $m $m $S
    elif [ -n "$ver" ]; then printf '\t%s => %s %s\n' $m $tgt $ver; fi
  done
  printf ')\n'
} > go.mod
printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kube-proxy"\n' > tools.go
[ -n "${XSYS:-}" ] && sed -i "s#golang.org/x/sys => golang.org/x/sys .*#golang.org/x/sys => golang.org/x/sys $XSYS#" go.mod
rm -f go.sum
nice -n 10 go mod tidy
P=k8s.io/component-base/version; MAJ=$(echo $V | cut -d. -f1 | tr -d v); MIN=$(echo $V | cut -d. -f2)
time nice -n 10 go build -trimpath -ldflags "-X $P.gitVersion=$V -X $P.gitMajor=$MAJ -X $P.gitMinor=$MIN -X $P.gitTreeState=clean ${EXTRA_LDFLAGS:-}" -o $H/$V/bin/kube-proxy k8s.io/kubernetes/cmd/kube-proxy
$H/$V/bin/kube-proxy --version
