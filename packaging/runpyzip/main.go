// Command runpyzip appends to a plugin executable a zip archive holding a
// __main__.py that re-executes the same file, so that the executable is
// also a valid target of Python's runpy.run_path.
//
// Why: when a xapi Observer covers the "smapi" component,
// xapi-storage-script runs each SMAPIv3 method as `python3 -m observer
// <method file> --json`, and xen-api's python3/packages/observer.py loads
// the file with runpy.run_path(file, run_name="__main__"). Given a plain
// ELF, runpy compiles it as Python source and fails ("source code string
// cannot contain null bytes", exit 139). runpy first asks the zip importer,
// which finds an archive by its end-of-central-directory record at the end
// of the file and accepts data before the archive (self-extracting
// archives; CPython's zipimport, both the C one of 3.6 and the Python one
// of 3.8+). So an ELF with a zip appended is both: the kernel runs the ELF
// (the trailing bytes are in no segment and never loaded, so a direct exec
// costs nothing), and runpy runs __main__.py, which execs the executable
// with the same argv (argv[0] names the method) and stdin/stdout/stderr.
//
// Usage: runpyzip FILE... (rewrites each FILE in place; idempotent).
package main

import (
	"archive/zip"
	"bytes"
	"fmt"
	"hash/crc32"
	"os"
)

// mainPy runs where observer.py's runpy.run_path put us: sys.argv is the
// method's [path, "--json"], fds 0-2 are xapi-storage-script's pipes,
// untouched (observer.py reads and writes none of them).
const mainPy = `# luksext: this file is a static Go executable with a zip archive appended
# (packaging/runpyzip). Under runpy.run_path (xapi's observer.py wrapper),
# hand over to the executable itself: same path, same argv, same stdin,
# stdout and stderr; the exit code becomes the wrapper's.
import os
import signal
import sys

for s in (sys.stdout, sys.stderr):
    try:
        s.flush()
    except Exception:
        pass
# Python ignores SIGPIPE and SIGXFSZ; exec keeps ignored signals ignored.
for name in ("SIGPIPE", "SIGXFSZ"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
os.execv(sys.argv[0], sys.argv)
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: runpyzip FILE...")
		os.Exit(2)
	}
	for _, f := range os.Args[1:] {
		if err := appendZip(f); err != nil {
			fmt.Fprintf(os.Stderr, "runpyzip: %s: %v\n", f, err)
			os.Exit(1)
		}
	}
}

func appendZip(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(b, []byte("\x7fELF")) {
		return fmt.Errorf("not an ELF executable")
	}
	b = stripOld(b)
	var buf bytes.Buffer
	buf.Write(b)
	w := zip.NewWriter(&buf)
	// Offsets relative to the start of the file (as `zip -A` makes them):
	// every zip reader finds the members without guessing.
	w.SetOffset(int64(len(b)))
	// Stored, with sizes and CRC in the local header (no data descriptor):
	// the plainest member any zip reader accepts (CPython 3.6's C
	// zipimport on dom0 included), and no zlib needed to read it.
	h := &zip.FileHeader{Name: "__main__.py", Method: zip.Store,
		CRC32: crc32.ChecksumIEEE([]byte(mainPy)), CompressedSize64: uint64(len(mainPy)), UncompressedSize64: uint64(len(mainPy))}
	h.SetMode(0o644)
	fw, err := w.CreateRaw(h)
	if err != nil {
		return err
	}
	if _, err := fw.Write([]byte(mainPy)); err != nil {
		return err
	}
	// No archive comment: CPython 3.6's zipimport looks for the end
	// record exactly 22 bytes before the end of the file.
	if err := w.Close(); err != nil {
		return err
	}
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	tmp := path + ".runpyzip"
	if err := os.WriteFile(tmp, buf.Bytes(), st.Mode().Perm()); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// stripOld drops an archive this tool appended before (its __main__.py
// starts with our comment line), so running it twice changes nothing.
func stripOld(b []byte) []byte {
	r, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil || len(r.File) != 1 || r.File[0].Name != "__main__.py" {
		return b
	}
	off, err := r.File[0].DataOffset()
	if err != nil {
		return b
	}
	// Local file header: 30 bytes + name; it starts the archive.
	start := off - 30 - int64(len(r.File[0].Name)) - int64(len(r.File[0].Extra))
	if start <= 0 || start > int64(len(b)) {
		return b
	}
	rc, err := r.File[0].Open()
	if err != nil {
		return b
	}
	defer rc.Close()
	head := make([]byte, len("# luksext:"))
	if _, err := rc.Read(head); err != nil || string(head) != "# luksext:" {
		return b
	}
	return b[:start]
}
