#!/usr/bin/env bash
# Installs the two plugin binaries and their method symlinks under DESTDIR:
#   usr/libexec/luksext/{volume,datapath}                        the binaries
#   usr/libexec/xapi-storage-script/volume/org.xen.xapi.storage.luksext/<Method> -> ../../../luksext/volume
#   usr/libexec/xapi-storage-script/datapath/luksext/<Method>               -> ../../../luksext/datapath
# The method lists come from the binaries themselves (--list-methods), i.e.
# from the same tables that drive dispatch.
#
# Atomic for xapi-storage-script, which watches volume/ and datapath/ with
# inotify and registers a datapath plugin as soon as its directory appears
# (silently never if Plugin.Query is not there yet): a new plugin directory
# is assembled outside the watched directories and renamed into place; in an
# existing one each entry is replaced by rename. Binaries are replaced by
# rename too, so a running call keeps its old inode.
set -euo pipefail
destdir=${1:?usage: install-layout.sh DESTDIR BINDIR}
bindir=${2:?usage: install-layout.sh DESTDIR BINDIR}
libexec="$destdir/usr/libexec"
root="$libexec/xapi-storage-script"

install -d -m 0755 "$libexec/luksext" "$root/volume" "$root/datapath"
for bin in volume datapath; do
	tmp=$(mktemp "$libexec/luksext/.$bin.XXXXXX")
	install -m 0755 "$bindir/$bin" "$tmp"
	mv -f "$tmp" "$libexec/luksext/$bin"
done

# The operator command (luksext status/unlock/rebind...) is the volume binary under another name.
install -d -m 0755 "$destdir/usr/sbin" && ln -sfn ../libexec/luksext/volume "$destdir/usr/sbin/.luksext.new" && mv -Tf "$destdir/usr/sbin/.luksext.new" "$destdir/usr/sbin/luksext"

place() { # place BIN PLUGINDIR
	local bin=$1 dir=$2 target="../../../luksext/$1"
	local methods
	methods=$("$libexec/luksext/$bin" --list-methods)
	if [ ! -d "$dir" ]; then
		local stage
		stage=$(mktemp -d "$root/.luksext-staging.XXXXXX")
		for m in $methods; do ln -s "$target" "$stage/$m"; done
		chmod 0755 "$stage"
		mv -T "$stage" "$dir"
		return
	fi
	for m in $methods; do
		ln -sfn "$target" "$dir/.$m.new"
		mv -Tf "$dir/.$m.new" "$dir/$m"
	done
	# Drop entries no longer in the table (an upgrade removed a method).
	local e
	for e in "$dir"/*; do
		[ -e "$e" ] || [ -L "$e" ] || continue
		grep -qxF "$(basename "$e")" <<<"$methods" || rm -f "$e"
	done
}
place volume "$root/volume/org.xen.xapi.storage.luksext"
place datapath "$root/datapath/luksext"
echo "installed luksext plugins under ${destdir%/}/usr/libexec"
