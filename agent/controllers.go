package agent

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"segmesh/agent/statefile"
	"segmesh/api/segmeshv1"
)

// This file is controller failover: the agent knows every controller replica's
// URL (from --controller and from the ControllerSet updates on its stream), uses
// one at a time for every call, and moves to the next one when its stream is
// lost.

// MaxControllers is the most controller URLs an agent keeps: more on the command
// line is an error; a ControllerSet from a controller is cut to this many (keeping
// the URL in use).
const MaxControllers = 16

// maxControllerURL bounds the length of one controller URL a ControllerSet may
// carry, in bytes; longer ones are dropped.
const maxControllerURL = 1024

// featureControllers in SyncRequest.features asks the controller for
// NetmapUpdate.controllers (ControllerSet) updates.
const featureControllers = "controllers"

// stableStream is how long a netmap stream must have stayed open, having
// delivered a netmap, to count as a success that starts a new round of
// failover (see failover).
const stableStream = 5 * time.Second

// controllers is the list of controller URLs an agent knows and the one in use.
// It is safe for concurrent use.
type controllers struct {
	mu       sync.Mutex
	urls     []string // never empty once set up
	cur      int      // index in urls of the URL in use
	switches uint64   // moves to a different URL since the agent started
}

// newControllers returns the list urls (non-empty, checked) with current in use,
// or the first when current is not among them.
func newControllers(urls []string, current string) *controllers {
	c := &controllers{urls: slices.Clone(urls)}
	if i := slices.Index(c.urls, current); i >= 0 {
		c.cur = i
	}
	return c
}

// current returns the URL in use.
func (c *controllers) current() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.urls[c.cur]
}

// snapshot returns a copy of the list and the URL in use.
func (c *controllers) snapshot() (urls []string, current string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.urls), c.urls[c.cur]
}

// count returns how many URLs are known.
func (c *controllers) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.urls)
}

// inTurn returns the list starting at the URL in use, then the ones after it
// in order, wrapping around: the order in which to try them.
func (c *controllers) inTurn() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append(slices.Clone(c.urls[c.cur:]), c.urls[:c.cur]...)
}

// advance puts the next URL (after the one in use, wrapping around) in use and
// returns the previous and the new one; they are equal with a single URL.
func (c *controllers) advance() (from, to string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	from = c.urls[c.cur]
	c.cur = (c.cur + 1) % len(c.urls)
	to = c.urls[c.cur]
	if to != from {
		c.switches++
	}
	return from, to
}

// use puts url in use; it must be in the list (else nothing changes).
func (c *controllers) use(url string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i := slices.Index(c.urls, url); i >= 0 && i != c.cur {
		c.cur = i
		c.switches++
	}
}

// switchCount returns how many times the agent moved to a different URL.
func (c *controllers) switchCount() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.switches
}

// replace makes urls (checked, without duplicates) the list while keeping the
// URL in use: when urls lacks it, or it would fall past MaxControllers, it goes
// first. The list is cut to MaxControllers. It returns the previous and the new
// list and whether they differ; cut says how many URLs did not fit.
func (c *controllers) replace(urls []string) (old, now []string, changed bool, cut int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cur := c.urls[c.cur]
	now = slices.Clone(urls)
	if i := slices.Index(now, cur); i < 0 || i >= MaxControllers {
		now = append([]string{cur}, slices.DeleteFunc(now, func(u string) bool { return u == cur })...)
	}
	if len(now) > MaxControllers {
		cut = len(now) - MaxControllers
		now = now[:MaxControllers]
	}
	old = c.urls
	if slices.Equal(old, now) {
		return slices.Clone(old), slices.Clone(now), false, cut
	}
	c.urls = now
	c.cur = slices.Index(now, cur)
	return slices.Clone(old), slices.Clone(now), true, cut
}

// checkControllerURLs checks every URL of urls with checkControllerURL (what
// names their source in errors) and that it has at most maxControllerURL bytes,
// and drops duplicates (the first stays). It returns the good URLs in order and
// an error for each bad one.
func checkControllerURLs(what string, urls []string) (good []string, bad []error) {
	for _, u := range urls {
		var err error
		if len(u) > maxControllerURL {
			err = fmt.Errorf("%s %.64q...: longer than %d bytes", what, u, maxControllerURL)
		} else {
			err = checkControllerURL(what, u)
		}
		switch {
		case err != nil:
			bad = append(bad, err)
		case !slices.Contains(good, u):
			good = append(good, u)
		}
	}
	return good, bad
}

// mergeControllers returns the URLs of --controller (flag, checked) followed by
// the stored ones it lacks, without duplicates, cut to MaxControllers: the
// operator's URLs come first, and those the controllers sent stay as fallbacks.
func mergeControllers(flag, stored []string) []string {
	out := slices.Clone(flag)
	for _, u := range stored {
		if !slices.Contains(out, u) {
			out = append(out, u)
		}
	}
	if len(out) > MaxControllers {
		out = out[:MaxControllers]
	}
	return out
}

// failover decides, each time a netmap stream ended (or could not be opened),
// how long to wait before the next attempt, which goes to the next controller
// URL. It switches at once while some URL of the current round is untried; a
// round is every known URL failing in turn. After a full round it waits the
// backoff (1 s doubling to 30 s, jittered), so that an unreachable fleet is not
// hammered. A stream that delivered a netmap resets the backoff; one that also
// stayed open for stableStream starts a new round.
type failover struct {
	bo     *backoff
	failed int // attempts since the round started
}

// next records the end of an attempt (received: the stream delivered a
// netmap; stable: it also stayed open for stableStream) with n URLs known, and
// returns the wait before the next attempt.
func (f *failover) next(received, stable bool, n int) time.Duration {
	if received {
		f.bo.reset()
	}
	if stable {
		f.failed = 0
	}
	f.failed++
	if f.failed < n {
		return 0
	}
	f.failed = 0
	return f.bo.next()
}

// handleControllerSet takes a ControllerSet from the stream: its URLs (checked;
// bad ones dropped with a warning) replace the known list, keeping the one in
// use, and a changed list is stored in identity.json and logged. A set equal to
// the previous one received is ignored, so that the warnings and the log come
// once per change, not once per reconnect.
func (a *agent) handleControllerSet(set *segmeshv1.ControllerSet) {
	raw := set.GetUrls()
	a.mu.Lock()
	same := a.lastSet != nil && slices.Equal(a.lastSet, raw)
	a.lastSet = slices.Clone(raw)
	a.mu.Unlock()
	if same {
		return
	}
	good, bad := checkControllerURLs("controller URL", raw)
	for _, err := range bad {
		a.log.Warn("ignoring a controller URL the controller sent", "err", err)
	}
	if len(raw) > 0 && len(good) == 0 {
		a.log.Warn("the controller sent no usable controller URL; keeping the known ones", "controllers", a.ctl.inTurn())
		return
	}
	old, now, changed, cut := a.ctl.replace(good)
	if cut > 0 {
		a.log.Warn(fmt.Sprintf("the controller sent more than %d controller URLs; keeping the first ones", MaxControllers), "dropped", cut)
	}
	if !changed {
		return
	}
	// Every replica sends itself first: a failover changes the order only, which
	// is stored but not worth a log line.
	msg, level := "controller replicas changed", slog.LevelInfo
	if sorted(old) == sorted(now) {
		msg, level = "controller replicas reordered", slog.LevelDebug
	}
	a.log.Log(context.Background(), level, msg, "old", strings.Join(old, ","), "new", strings.Join(now, ","), "in_use", a.ctl.current())
	if err := a.saveIdentity(nil); err != nil {
		a.log.Error("storing the controller URLs; a restart uses the previous ones", "err", err)
	}
}

// sorted returns urls sorted and comma-joined, to compare lists as sets.
func sorted(urls []string) string {
	s := slices.Clone(urls)
	slices.Sort(s)
	return strings.Join(s, ",")
}

// saveIdentity stores the identity with fn applied (nil: none) and the current
// controller URLs (the list and the one in use), when that differs from what
// was stored. Every identity write after start goes through it, so that none
// undoes another's field.
func (a *agent) saveIdentity(fn func(*statefile.Identity)) error {
	a.idMu.Lock()
	defer a.idMu.Unlock()
	id := a.stored
	id.Controllers = slices.Clone(id.Controllers)
	if fn != nil {
		fn(&id)
	}
	id.Controllers, id.Controller = a.ctl.snapshot()
	if fn == nil && id.Controller == a.stored.Controller && slices.Equal(id.Controllers, a.stored.Controllers) {
		return nil
	}
	if err := a.dir.SaveIdentity(id); err != nil {
		return err
	}
	a.stored = id
	return nil
}

// setStored records id as the identity stored in the state directory (before
// the loops start).
func (a *agent) setStored(id statefile.Identity) {
	a.idMu.Lock()
	defer a.idMu.Unlock()
	a.stored = id
}
