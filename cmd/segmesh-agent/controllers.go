package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/pflag"
)

// controllerURLs is the value of --controller: a list of controller URLs, given
// comma-separated ("https://10.0.0.1:7443,https://10.0.0.2:7443"), by repeating
// the flag, or both. On the command line every occurrence adds to the list; once
// the command line is parsed (seal), a value from $SEGMESH_CONTROLLER or the
// --config file ("controller: https://10.0.0.1:7443,https://10.0.0.2:7443", a
// scalar as before) replaces the list, so that daemonconfig's precedence holds. It
// is deliberately not a pflag.SliceValue: a configuration file of an agent from
// before failover, "controller: URL", stays valid. The agent checks the URLs
// themselves (agent.Options.Controllers).
type controllerURLs struct {
	urls   *[]string
	sealed bool // Set replaces instead of adding
}

var _ pflag.Value = (*controllerURLs)(nil)

// String returns the URLs comma-separated.
func (v *controllerURLs) String() string { return strings.Join(*v.urls, ",") }

// Type names the value in usage texts.
func (v *controllerURLs) Type() string { return "URL[,URL...]" }

// Set adds the comma-separated URLs of s (replaces the list once sealed).
// Errors: an empty item ("a,,b", a trailing comma).
func (v *controllerURLs) Set(s string) error {
	var add []string
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			return errors.New(`empty URL in the list: give URLs separated by single commas, e.g. https://10.0.0.1:7443,https://10.0.0.2:7443`)
		}
		add = append(add, item)
	}
	if v.sealed {
		*v.urls = add
	} else {
		*v.urls = append(*v.urls, add...)
	}
	return nil
}

// seal makes later Sets replace the list: call it once the command line is
// parsed, before the environment and the configuration file are applied.
func seal(fs *pflag.FlagSet) error {
	f := fs.Lookup("controller")
	if f == nil {
		return nil
	}
	v, ok := f.Value.(*controllerURLs)
	if !ok {
		return fmt.Errorf("--controller has a value of type %T", f.Value)
	}
	v.sealed = true
	return nil
}
