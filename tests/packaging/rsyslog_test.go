package packaging

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/syslog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/logging"
	"github.com/luksext/luksext/plugins/testenv"
)

// xcpngLocal2Rules are the two rules of XCP-ng 8.3's
// /etc/rsyslog.d/xenserver.conf (package xcp-ng-release) that decide where
// local2 goes: info and above to SMlog, then everything not yet taken is
// discarded ("ignore default rules").
const xcpngLocal2Rules = `$outchannel sm_log,%s,104857600,/etc/cron.daily/logrotate
local2.info			:omfile:$sm_log
*.*				~
`

// runRsyslog starts a real rsyslogd in the foreground on a private socket
// with our packaged snippet (and optionally XCP-ng's local2 rules) in its
// include directory, sends lines with send, stops it, and returns SMlog.
func runRsyslog(t *testing.T, withXCPngRules bool, send func(sock string)) string {
	t.Helper()
	tools := testenv.Tools(t, "rsyslogd")
	dir := t.TempDir()
	smlog := filepath.Join(dir, "SMlog")
	sock := filepath.Join(dir, "log")
	confd := filepath.Join(dir, "rsyslog.d")
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "work"), 0o755))
	require.NoError(t, os.MkdirAll(confd, 0o755))

	snippet, err := os.ReadFile(filepath.Join(repoRoot(t), "packaging/rsyslog/luksext.conf"))
	require.NoError(t, err)
	require.Contains(t, string(snippet), `"/var/log/SMlog"`)
	require.NoError(t, os.WriteFile(filepath.Join(confd, "luksext.conf"),
		[]byte(strings.ReplaceAll(string(snippet), "/var/log/SMlog", smlog)), 0o644))
	if withXCPngRules {
		require.NoError(t, os.WriteFile(filepath.Join(confd, "xenserver.conf"), []byte(fmt.Sprintf(xcpngLocal2Rules, smlog)), 0o644))
	}
	main := fmt.Sprintf(`global(workDirectory=%q)
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket=%q)
$IncludeConfig %s/*.conf
`, filepath.Join(dir, "work"), sock, confd)
	conf := filepath.Join(dir, "rsyslog.conf")
	require.NoError(t, os.WriteFile(conf, []byte(main), 0o644))

	check, err := exec.Command(tools["rsyslogd"], "-N1", "-f", conf).CombinedOutput()
	require.NoError(t, err, "rsyslogd -N1 rejects the configuration: %s", check)

	cmd := exec.Command(tools["rsyslogd"], "-n", "-f", conf, "-i", filepath.Join(dir, "pid"))
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	t.Cleanup(stop)
	require.Eventually(t, func() bool { _, err := os.Stat(sock); return err == nil }, 10*time.Second, 20*time.Millisecond,
		"rsyslogd did not open its socket: %s", &stderr)

	send(sock)
	// A last line that both configurations write, so we know every earlier
	// line has been processed before rsyslogd is stopped.
	marker := "flush-" + randomHex(t)
	w, err := syslog.Dial("unixgram", sock, syslog.LOG_LOCAL2|syslog.LOG_ERR, logging.SyslogTag)
	require.NoError(t, err)
	require.NoError(t, w.Err(marker))
	w.Close()
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile(smlog)
		return strings.Contains(string(b), marker)
	}, 10*time.Second, 20*time.Millisecond, "marker never reached SMlog: %s", &stderr)
	stop()
	b, err := os.ReadFile(smlog)
	require.NoError(t, err)
	return string(b)
}

func randomHex(t *testing.T) string {
	b := make([]byte, 6)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return hex.EncodeToString(b)
}

type line struct {
	prio syslog.Priority
	tag  string
	text string
}

func sendLines(t *testing.T, sock string, lines []line) {
	t.Helper()
	for _, l := range lines {
		w, err := syslog.Dial("unixgram", sock, l.prio, l.tag)
		require.NoError(t, err)
		_, err = w.Write([]byte(l.text))
		require.NoError(t, err)
		w.Close()
	}
}

// On an XCP-ng host every luksext line lands in SMlog exactly once, debug
// included (XCP-ng's own rule stops at info), and other programs' local2
// lines keep their usual routing.
func TestRsyslogSnippetOnXCPngRouting(t *testing.T) {
	id := randomHex(t)
	lines := []line{
		{syslog.LOG_LOCAL2 | syslog.LOG_DEBUG, logging.SyslogTag, "luksext-debug-" + id},
		{syslog.LOG_LOCAL2 | syslog.LOG_INFO, logging.SyslogTag, "luksext-info-" + id},
		{syslog.LOG_LOCAL2 | syslog.LOG_ERR, logging.SyslogTag, "luksext-err-" + id},
		{syslog.LOG_LOCAL2 | syslog.LOG_INFO, "SM", "sm-info-" + id},
		{syslog.LOG_LOCAL2 | syslog.LOG_DEBUG, "SM", "sm-debug-" + id},
		{syslog.LOG_LOCAL5 | syslog.LOG_INFO, logging.SyslogTag, "luksext-local5-" + id},
	}
	smlog := runRsyslog(t, true, func(sock string) { sendLines(t, sock, lines) })
	for _, want := range []string{"luksext-debug-", "luksext-info-", "luksext-err-", "sm-info-"} {
		assert.Equal(t, 1, strings.Count(smlog, want+id), "%s%s must be in SMlog exactly once:\n%s", want, id, smlog)
	}
	assert.NotContains(t, smlog, "sm-debug-"+id, "XCP-ng's own routing of other programs is unchanged")
	assert.NotContains(t, smlog, "luksext-local5-"+id, "only local2 is ours")
	assert.Contains(t, smlog, logging.SyslogTag+"[", "lines keep the program name admins grep for")
}

// On a host without XCP-ng's local2 rule the snippet alone delivers.
func TestRsyslogSnippetAlone(t *testing.T) {
	id := randomHex(t)
	smlog := runRsyslog(t, false, func(sock string) {
		sendLines(t, sock, []line{
			{syslog.LOG_LOCAL2 | syslog.LOG_DEBUG, logging.SyslogTag, "luksext-debug-" + id},
			{syslog.LOG_LOCAL2 | syslog.LOG_INFO, "SM", "sm-info-" + id},
		})
	})
	assert.Equal(t, 1, strings.Count(smlog, "luksext-debug-"+id), smlog)
	assert.NotContains(t, smlog, "sm-info-"+id, "the snippet takes luksext lines only")
}
