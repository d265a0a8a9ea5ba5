#!/usr/bin/env bash
# Prints "VERSION RELEASE" for the RPM, derived from `git describe` in the
# repository given as $1 (default: the current directory).
#
#   tag v1.2.3 on HEAD, clean tree   -> 1.2.3 1
#   tag v2.0-rc1                     -> 2.0~rc1 1            (sorts before 2.0)
#   4 commits after v1.2.3           -> 1.2.3 1.4.g<hash>   (sorts after 1.2.3-1)
#   no v* tag at all                 -> 0.0.0 0.<commits>.g<hash>
#   uncommitted changes              -> ... .dirty appended to RELEASE
#   not a git checkout (tarball)     -> 0.0.0 0
#
# RPM forbids '-' in Version and Release, so git's separators become dots;
# the distribution tag (%{?dist}) is added by the spec, not here.
set -euo pipefail
repo=${1:-.}
g() { git -C "$repo" "$@" 2>/dev/null; }

if ! g rev-parse --git-dir >/dev/null; then
	echo "0.0.0 0"
	exit 0
fi
dirty=""
if [ -n "$(g status --porcelain --untracked-files=no)" ]; then
	dirty=".dirty"
fi
if desc=$(g describe --tags --long --match 'v[0-9]*' --abbrev=7); then
	# v1.2.3-4-gabcdef0 (--long always gives the count, 0 on the tag itself)
	hash=${desc##*-}
	rest=${desc%-*}
	count=${rest##*-}
	tag=${rest%-*}
	version=${tag#v}
	# a pre-release tag (v2.0-rc1) sorts before its release: 2.0~rc1 < 2.0
	version=${version//-/\~}
	if [ "$count" = 0 ]; then
		release="1"
	else
		release="1.$count.$hash"
	fi
else
	count=$(g rev-list --count HEAD || echo 0)
	hash=g$(g rev-parse --short=7 HEAD || echo unknown)
	version="0.0.0"
	release="0.$count.$hash"
fi
echo "$version $release$dirty"
