#!/usr/bin/env bash
# Builds the binary and source RPM from this repository into OUTDIR (make rpm).
#
#   Source0  luksext-V.tar.gz          the repository as `go build` sees it in the
#                                      working tree (tracked and untracked files,
#                                      minus .gitignore), so `make test` tests the
#                                      tree at hand; with RPM_FROM=HEAD exactly
#                                      `git archive HEAD` (release builds)
#   Source1  luksext-V-vendor.tar.gz   `go mod vendor` of that tree, made from the
#                                      local module cache with GOPROXY=off: works
#                                      offline once `go mod download` has run
#
# rpmbuild runs in a private top directory (outside the repository, so no
# go.mod or vendor/ of a half-built tree is ever seen by `go test ./...`);
# the results, plus a SOURCES/ + SPECS/ tree for XCP-ng's build container,
# are copied to OUTDIR.
set -euo pipefail
outdir=${1:?usage: build-rpm.sh OUTDIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
from=${RPM_FROM:-worktree}
export PATH="$PATH:/usr/local/go/bin"

command -v rpmbuild >/dev/null || { echo "rpmbuild not found: install the Debian package 'rpm'" >&2; exit 1; }

read -r version release < <("$repo/packaging/rpm-version.sh" "$repo")
name=luksext
top=$(mktemp -d "${TMPDIR:-/tmp}/luksext-rpm.XXXXXX")
trap 'chmod -R u+w "$top" 2>/dev/null; rm -rf "$top"' EXIT
mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS,tree}
src="$top/tree/$name-$version"
mkdir -p "$src"

case "$from" in
HEAD)
	git -C "$repo" archive --format=tar HEAD | tar -x -C "$src"
	;;
worktree)
	# The files `go build` sees here: tracked and untracked, minus what
	# .gitignore excludes (build/, vendor/); deleted tracked files left out.
	(cd "$repo" && git ls-files -z --cached --others --exclude-standard | sort -zu | while IFS= read -r -d '' f; do
		if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
	done | tar --null --no-recursion -T - -cf -) | tar -x -C "$src"
	;;
*)
	echo "RPM_FROM must be HEAD or worktree, not $from" >&2
	exit 1
	;;
esac

# Vendor from the module cache only: GOPROXY=off makes a missing module an
# immediate, explicit error instead of a silent download.
(cd "$src" && GOFLAGS=-mod=mod GOPROXY=off GOTOOLCHAIN=local go mod vendor -o "$top/tree/vendor") || {
	echo "go mod vendor failed offline: run 'go mod download' once with network access" >&2
	exit 1
}
# Reproducible tarballs: fixed order, owner and times.
mtime=$(git -C "$repo" log -1 --format=%cI 2>/dev/null || echo 2000-01-01T00:00:00Z)
tarc() { tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="$mtime" -C "$1" -czf "$2" "$3"; }
tarc "$top/tree" "$top/SOURCES/$name-$version.tar.gz" "$name-$version"
tarc "$top/tree" "$top/SOURCES/$name-$version-vendor.tar.gz" vendor

# The staged spec carries its version, so the SRPM rebuilds identically.
{
	echo "%global pkg_version $version"
	echo "%global pkg_release $release"
	cat "$repo/xcp-ng.spec"
} >"$top/SPECS/$name.spec"

# --nodeps: on Debian the RPM database is empty, so BuildRequires (make,
# bash) cannot be checked by rpm; they are Debian packages here.
rpmbuild -ba --nodeps --define "_topdir $top" "$top/SPECS/$name.spec"

mkdir -p "$outdir"
rm -f "$outdir"/*.rpm
cp "$top"/RPMS/*/*.rpm "$top"/SRPMS/*.src.rpm "$outdir"/
rm -rf "$outdir/SOURCES" "$outdir/SPECS"
cp -r "$top/SOURCES" "$top/SPECS" "$outdir"/
ls -1 "$outdir"/*.rpm
