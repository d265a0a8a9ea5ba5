package operator

import (
	"context"
	"fmt"
	"sort"
	"strings"
)

// cmdline is a parsed command line. Flags may come before or after the
// positional arguments, as in cryptsetup and clevis.
type cmdline struct {
	JSON, Help, Verbose, Force, Yes bool
	KeyFile, NewKeyFile, Names      string
	Args                            []string // after the verb
	set                             map[string]bool
}

// verb is one operator command.
type verb struct {
	Name    string // "rebind", "recovery rotate"
	Usage   string // after the program name
	Summary string
	Help    string
	Flags   []string // accepted besides the global ones
	MinArgs int
	MaxArgs int
	Run     func(*admin, context.Context) (report, error)
}

var globalFlags = map[string]string{
	"--json":    "print one JSON object on stdout (errors too: {\"error\":{kind,message,exit_code}})",
	"--help":    "show help (also -h, or `luksext help VERB`)",
	"--verbose": "also print the log lines on stderr (also -v); they always go to syslog (SMlog)",
}

var flagHelp = map[string]string{
	"--key-file":     "read the current recovery passphrase from FILE, or stdin with '-' (one trailing newline is ignored); without it you are prompted, with no echo, when no binding unseals",
	"--new-key-file": "read the NEW recovery passphrase from FILE ('-' for stdin); without it you are prompted twice",
	"--force":        "do it even if it leaves fewer ways to unlock the disk than the safety rule asks for",
	"--yes":          "do not ask for confirmation (also -y)",
	"--names":        "the saved output of 'xe vdi-list sr-uuid=SR params=all': VDI names, descriptions, read-only and sharable flags",
}

const keyAuthHelp = `Authorisation: a key change needs the disk key. luksext first tries every
clevis binding (TPM, Tang, sss) and uses the first that unseals; only if none
does, it asks for the recovery passphrase (prompt with no echo, or --key-file).
A wrong passphrase is tried once, never again: exit code 3, nothing changed.

Safety: the new keyslot is added and proven to unlock before the old one is
removed, and a journal in ` + DefaultJournalDir + ` lets a rerun finish or
undo a change cut short by a crash (any key-changing verb settles it first).
Every key-changing verb takes the same SR lock as SR.attach/SR.create.`

// verbs is the command table: parsing, dispatch and help come from it.
var verbs = []*verb{
	{Name: "status", Usage: "status [SR]", MaxArgs: 1,
		Summary: "list luksext SRs with their keyslots and whether each binding unseals now",
		Help: `Lists every luksext SR whose disk is on this host (or only SR, given as SR
uuid or device path; any LUKS device path works, e.g. a clevis-bound disk made
by hand): device, LUKS uuid, whether it is unlocked and mounted, each keyslot
with its clevis binding (tpm2 PCR bank and ids, Tang URL and thumbprint, sss
threshold) or "passphrase" (the recovery passphrase), and whether each binding
unseals right now. The check is a dry run: the sealed key is decrypted and
tested against its keyslot; nothing is opened or changed.
Exit code 5 when an SR shown has no binding that unseals (it will not attach by
itself: see 'luksext unlock' and 'luksext rebind').`,
		Run: (*admin).status},
	{Name: "unlock", Usage: "unlock SR [--key-file FILE|-]", MinArgs: 1, MaxArgs: 1, Flags: []string{"--key-file"},
		Summary: "open the SR's disk with the recovery passphrase, so that xe pbd-plug works",
		Help: `Opens the dm-crypt mapping luksext-<sr uuid> with the recovery passphrase,
for when the TPM refuses (firmware or Secure Boot update, new board, cleared
TPM). The passphrase is prompted with no echo, or read from --key-file (use
'-' for stdin in scripts); it is never taken from the command line. Then plug
the SR as usual (xe pbd-plug): SR.attach uses the open mapping and asks for
nothing. A wrong passphrase exits with code 3 and is not retried.
Afterwards, make the TPM work again: 'luksext rebind SR SLOT'.`,
		Run: (*admin).unlock},
	{Name: "bind", Usage: "bind SR tpm2|tang|sss CONFIG [--key-file FILE|-]", MinArgs: 3, MaxArgs: 3, Flags: []string{"--key-file"},
		Summary: "add a keyslot sealed with a clevis policy (TPM, Tang, sss)",
		Help: `Adds a keyslot whose random passphrase is sealed with the clevis policy
CONFIG (clevis' own JSON), stores the binding where clevis does (LUKS2 token or
LUKS1 luksmeta) and proves it unlocks. Examples:
  luksext bind SR tpm2 '{"pcr_ids":"7"}'
  luksext bind SR tang '{"url":"http://tang.example:7500","thp":"<thumbprint>"}'
  luksext bind SR sss '{"t":1,"pins":{"tpm2":{},"tang":[{"url":"...","thp":"..."}]}}'
A Tang server needs its thumbprint (tang-show-keys on the server); a server
whose key does not match is refused (exit 8) before the disk is touched.`,
		Run: (*admin).bind},
	{Name: "unbind", Usage: "unbind SR SLOT [--force] [--key-file FILE|-]", MinArgs: 2, MaxArgs: 2, Flags: []string{"--key-file", "--force"},
		Summary: "remove a clevis binding and its keyslot",
		Help: `Removes the clevis binding of keyslot SLOT and the keyslot itself (see
'luksext status' for the slot numbers). Refused (exit 7) when no other way in
would be left: another binding that unseals now, or a recovery passphrase;
--force overrides. Passphrase keyslots are removed with 'luksext recovery remove'.`,
		Run: (*admin).unbind},
	{Name: "rebind", Usage: "rebind SR SLOT [--key-file FILE|-]", MinArgs: 2, MaxArgs: 2, Flags: []string{"--key-file"},
		Summary: "re-seal a binding's policy to the TPM's current state (after an intended change)",
		Help: `Seals a new key with the SAME policy as keyslot SLOT's binding (same PCR ids
and bank, same Tang servers, same sss threshold) to the TPM's current PCR
values, adds it as a new keyslot, proves it unlocks, then removes SLOT. Use it
after an intended change (firmware, Secure Boot db/dbx, shim update, new
board) once 'luksext status' shows the binding no longer unseals. The keyslot
number changes (the new one is printed). Like 'clevis luks regen'.`,
		Run: (*admin).rebind},
	{Name: "recovery", Usage: "recovery set|rotate|remove SR", Summary: "manage the recovery passphrase",
		Help: `  recovery set SR      add a recovery passphrase (if the SR has none)
  recovery rotate SR   replace the recovery passphrase with a new one
  recovery remove SR   remove the recovery passphrase (refused when fewer than
                       two bindings that unseal would remain; --force)`},
	{Name: "recovery set", Usage: "recovery set SR [--new-key-file FILE|-] [--key-file FILE|-]", MinArgs: 1, MaxArgs: 1, Flags: []string{"--key-file", "--new-key-file"},
		Summary: "add a recovery passphrase keyslot",
		Help: `Adds a keyslot for a recovery passphrase you choose (at least 8 characters;
prompted twice with no echo, or --new-key-file). Running it again with the
same passphrase changes nothing. Keep the passphrase offline: it is the way in
when the TPM refuses.`,
		Run: (*admin).recoverySet},
	{Name: "recovery rotate", Usage: "recovery rotate SR [--new-key-file FILE|-] [--key-file FILE|-]", MinArgs: 1, MaxArgs: 1, Flags: []string{"--key-file", "--new-key-file"},
		Summary: "replace the recovery passphrase",
		Help: `Adds the new recovery passphrase, proves it opens its keyslot, then removes
the old recovery keyslot(s). If it is cut short, the next run of any
key-changing verb undoes the half-done change (the old passphrase still works).`,
		Run: (*admin).recoveryRotate},
	{Name: "recovery remove", Usage: "recovery remove SR [--force] [--key-file FILE|-]", MinArgs: 1, MaxArgs: 1, Flags: []string{"--key-file", "--force"},
		Summary: "remove the recovery passphrase",
		Help: `Removes every passphrase keyslot. Refused (exit 7) unless at least two
bindings that unseal now remain (one TPM alone is one firmware update away
from a locked disk); --force overrides.`,
		Run: (*admin).recoveryRemove},
	{Name: "adopt", Usage: "adopt DEVICE [--names FILE] [--key-file FILE|-]", MinArgs: 1, MaxArgs: 1, Flags: []string{"--key-file", "--names"},
		Summary: "turn a hand-made LUKS + SMAPIv1 ext SR into a luksext SR, in place",
		Help: `Takes over the SR on DEVICE that the hand-made recipe built (LUKS, clevis
binding, an SMAPIv1 'ext' SR: volume group XSLocalEXT-<sr uuid>, one logical
volume, ext4, <vdi uuid>.vhd files) while that SR is unplugged and forgotten and
its old mapping closed. It keeps the SR uuid and every VDI uuid (hidden base
copies become internal nodes of the snapshot tree), keeps every keyslot and the
clevis binding (stock 'clevis luks unlock' still opens the disk), checks the
filesystem, records the volumes and prints the device-config and the xe
commands that bring the SR back (sr-introduce, pbd-create, pbd-plug, sr-scan).
Names and descriptions come from --names (xe vdi-list sr-uuid=SR params=all,
saved before xe sr-forget); without it the VDIs are nameless.
Refused, with nothing changed, when the SR holds what luksext does not handle
(.raw VDIs, CBT logs, unfinished SMAPIv1 GC work, IntelliCache files, VHDs with
other block sizes, chains that do not resolve) or when the disk or its volume
is in use (exit 7 Not_adoptable, exit 6 In_use). Cut short (crash, kill),
rerun the same command: it finishes the same way. See README 'Moving from a
hand-made LUKS SR'.`,
		Run: (*admin).adopt},
	{Name: "header-backup", Usage: "header-backup SR FILE", MinArgs: 2, MaxArgs: 2,
		Summary: "save the LUKS header (cryptsetup luksHeaderBackup)",
		Help: `Writes the LUKS header, with every keyslot and binding, to FILE (which must
not exist). WARNING: the backup opens the disk with any passphrase or binding
valid NOW, even after you remove or change them on the disk. Keep it offline
and as safe as the recovery passphrase; destroy it after a passphrase change.`,
		Run: (*admin).headerBackup},
	{Name: "header-restore", Usage: "header-restore SR FILE [--yes] [--force]", MinArgs: 2, MaxArgs: 2, Flags: []string{"--yes", "--force"},
		Summary: "restore a LUKS header backup (cryptsetup luksHeaderRestore)",
		Help: `Replaces the disk's LUKS header with FILE. WARNING: this overwrites EVERY
keyslot and binding: keys added since the backup (e.g. by rebind) stop working,
and passphrases removed since work again. The SR must be detached. Asks for
confirmation unless --yes; a backup of another disk (different LUKS uuid) is
refused unless --force. SR may be the device path when the header is destroyed.`,
		Run: (*admin).headerRestore},
}

func findVerb(name string) *verb {
	for _, v := range verbs {
		if v.Name == name {
			return v
		}
	}
	return nil
}

// parseCommandLine splits args (without the program name) into the verb
// and its options. With no verb and no error, the caller prints the
// overview.
func parseCommandLine(args []string) (cmdline, *verb, error) {
	cl := cmdline{set: map[string]bool{}}
	var pos []string
	valueOf := func(i *int, name, arg string) (string, error) {
		if v, ok := strings.CutPrefix(arg, name+"="); ok {
			return v, nil
		}
		if *i+1 >= len(args) {
			return "", usageErr("%s needs a value", name)
		}
		*i++
		return args[*i], nil
	}
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if arg == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if arg == "-" || !strings.HasPrefix(arg, "-") {
			pos = append(pos, arg)
			continue
		}
		name, _, _ := strings.Cut(arg, "=")
		var err error
		switch name {
		case "--json":
			cl.JSON = true
		case "-h", "--help":
			cl.Help, name = true, "--help"
		case "-v", "--verbose":
			cl.Verbose, name = true, "--verbose"
		case "--force":
			cl.Force = true
		case "-y", "--yes":
			cl.Yes, name = true, "--yes"
		case "--key-file":
			cl.KeyFile, err = valueOf(&i, name, arg)
		case "--new-key-file":
			cl.NewKeyFile, err = valueOf(&i, name, arg)
		case "--names":
			cl.Names, err = valueOf(&i, name, arg)
		default:
			err = usageErr("unknown option %s", arg)
		}
		if err != nil {
			return cl, nil, err
		}
		cl.set[name] = true
	}
	if len(pos) > 0 && pos[0] == "help" {
		cl.Help, pos = true, pos[1:]
	}
	if len(pos) == 0 {
		return cl, nil, nil
	}
	name := pos[0]
	if name == "recovery" && len(pos) > 1 {
		name += " " + pos[1]
	}
	v := findVerb(name)
	if v == nil && name != pos[0] {
		if cl.Help {
			return cl, findVerb("recovery"), nil
		}
		return cl, findVerb("recovery"), usageErr("unknown recovery command %q (set, rotate or remove)", pos[1])
	}
	if v == nil {
		return cl, nil, usageErr("unknown command %q", name)
	}
	cl.Args = pos[len(strings.Fields(v.Name)):]
	if cl.Help {
		return cl, v, nil
	}
	if v.Run == nil {
		return cl, v, usageErr("%s needs a sub-command", v.Name)
	}
	for f := range cl.set {
		if _, global := globalFlags[f]; global {
			continue
		}
		ok := false
		for _, allowed := range v.Flags {
			ok = ok || allowed == f
		}
		if !ok {
			return cl, v, usageErr("%s does not take %s", v.Name, f)
		}
	}
	switch {
	case len(cl.Args) < v.MinArgs:
		return cl, v, usageErr("%s needs %d argument(s), got %d", v.Name, v.MinArgs, len(cl.Args))
	case len(cl.Args) > v.MaxArgs:
		return cl, v, usageErr("%s takes at most %d argument(s), got %d (%s)", v.Name, v.MaxArgs, len(cl.Args), strings.Join(cl.Args, " "))
	}
	return cl, v, nil
}

// helpText is the overview (v == nil) or one verb's page.
func helpText(v *verb) string {
	var b strings.Builder
	if v == nil {
		fmt.Fprintf(&b, "usage: %s VERB [ARGS] [--json] [--verbose]\n\n", Command)
		b.WriteString("Key management for luksext SRs (LUKS-encrypted ext4 whose key is sealed to\nthe TPM, optionally Tang), for when SMAPIv3 has no verb: the TPM refuses\nafter a firmware update, a Tang server is replaced, the recovery passphrase\nmust change. SR is the SR uuid (xe sr-list) or the disk's device path.\n\nVerbs:\n")
		for _, v := range verbs {
			if v.Run == nil {
				continue
			}
			fmt.Fprintf(&b, "  %-17s %s\n", v.Name, v.Summary)
		}
		b.WriteString("\nWhen the TPM refuses: luksext status → luksext unlock SR → xe pbd-plug →\nluksext rebind SR SLOT. '" + Command + " VERB --help' explains each verb.\n\n")
		b.WriteString(flagsText(nil))
		b.WriteString("\n" + exitCodeHelp + "\n")
		return b.String()
	}
	fmt.Fprintf(&b, "usage: %s %s\n\n%s\n\n%s\n", Command, v.Usage, v.Summary, v.Help)
	if len(v.Flags) > 0 && strings.Contains(strings.Join(v.Flags, " "), "--key-file") {
		b.WriteString("\n" + keyAuthHelp + "\n")
	}
	b.WriteString("\n" + flagsText(v.Flags))
	b.WriteString("\n" + exitCodeHelp + "\n")
	return b.String()
}

func flagsText(extra []string) string {
	var b strings.Builder
	b.WriteString("Options:\n")
	for _, f := range extra {
		fmt.Fprintf(&b, "  %-15s %s\n", f, flagHelp[f])
	}
	names := make([]string, 0, len(globalFlags))
	for f := range globalFlags {
		names = append(names, f)
	}
	sort.Strings(names)
	for _, f := range names {
		fmt.Fprintf(&b, "  %-15s %s\n", f, globalFlags[f])
	}
	return b.String()
}
