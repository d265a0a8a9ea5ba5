#!/usr/bin/env bash
# Checks that the XO wizard patch applies to a Xen Orchestra checkout
# (git apply --check: nothing is changed). Usage:
#   packaging/xo/check-xo-patch.sh /path/to/xen-orchestra
# The patch is made against XO 6.7.1 (commit 40dede9e11c90562df5cb46c6a83a9d91efedae1);
# the script says which commit it checked, and fails if the patch does not apply.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
patch="$here/xo-web-luksext-6.7.1.patch"
xo=${1:?usage: $0 /path/to/xen-orchestra checkout}
git -C "$xo" rev-parse --verify -q HEAD >/dev/null || { echo "$xo is not a git checkout" >&2; exit 2; }
commit=$(git -C "$xo" rev-parse HEAD)
if git -C "$xo" apply --check "$patch"; then
	echo "ok: $(basename "$patch") applies to $xo at $commit"
	git -C "$xo" apply --numstat "$patch" | awk '{printf "  +%s -%s %s\n", $1, $2, $3}'
else
	echo "FAIL: $(basename "$patch") does not apply to $xo at $commit" >&2
	exit 1
fi
