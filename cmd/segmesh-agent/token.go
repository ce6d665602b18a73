package main

import (
	"cmp"
	"fmt"
	"io"
	"os"
	"strings"
)

// tokenEnv is the environment variable that may carry the join token.
const tokenEnv = "SEGMESH_TOKEN"

// maxTokenBytes bounds what --token-file reads; a join token is about 100 bytes.
const maxTokenBytes = 64 << 10

// tokenSources are the places a join token may come from; at most one may be set.
type tokenSources struct {
	// Flag is --token; FlagSet says whether it was given (even empty), FlagWhat
	// names where in errors ("--token", or the key of a config file).
	Flag     string
	FlagSet  bool
	FlagWhat string
	// File is --token-file: a path, or "-" for standard input.
	File string
	// Env is $SEGMESH_TOKEN ("" when unset or empty).
	Env string
}

// resolveToken returns the join token from the one source that is set, or "" when
// none is. Errors: more than one source set (naming them), a token file that
// cannot be read, that group or other users may access (naming its mode and the
// chmod that fixes it), that is not a regular file, or that is empty or too large.
func resolveToken(src tokenSources, stdin io.Reader) (string, error) {
	var set []string
	flagWhat := cmp.Or(src.FlagWhat, "--token")
	if src.FlagSet {
		set = append(set, flagWhat)
	}
	if src.File != "" {
		set = append(set, "--token-file")
	}
	if src.Env != "" {
		set = append(set, "$"+tokenEnv)
	}
	if len(set) > 1 {
		return "", fmt.Errorf("the join token was given by %s: pass it one way only (prefer --token-file or $%s)", strings.Join(set, " and "), tokenEnv)
	}
	switch {
	case src.FlagSet:
		if strings.TrimSpace(src.Flag) == "" {
			return "", fmt.Errorf("%s is empty", flagWhat)
		}
		return strings.TrimSpace(src.Flag), nil
	case src.Env != "":
		return strings.TrimSpace(src.Env), nil
	case src.File == "-":
		return readToken("standard input (--token-file -)", stdin)
	case src.File != "":
		return readTokenFile(src.File)
	}
	return "", nil
}

// readTokenFile reads the token from path after checking, on the open file, that
// it is a regular file that only its owner can access.
func readTokenFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("--token-file %s is not a regular file (%s)", path, st.Mode().Type())
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("--token-file %s has mode %04o, so group or other users can read the join token: run chmod 600 %s", path, uint32(perm), path)
	}
	return readToken("--token-file "+path, f)
}

// readToken reads a token from r (at most maxTokenBytes), trimming white space
// around it; what names the source in errors.
func readToken(what string, r io.Reader) (string, error) {
	if r == nil {
		return "", fmt.Errorf("reading the join token from %s: no input", what)
	}
	b, err := io.ReadAll(io.LimitReader(r, maxTokenBytes+1))
	if err != nil {
		return "", fmt.Errorf("reading the join token from %s: %w", what, err)
	}
	if len(b) > maxTokenBytes {
		return "", fmt.Errorf("reading the join token from %s: more than %d bytes; a join token is one line of about 100 characters", what, maxTokenBytes)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("reading the join token from %s: empty", what)
	}
	return tok, nil
}

// checkSecretFile checks that the config file path, which holds the join token,
// is a regular file only its owner can access.
func checkSecretFile(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("--config %s holds the join token (token:) and has mode %04o, so group or other users can read it: run chmod 600 %s, or move the token to a token-file", path, uint32(perm), path)
	}
	return nil
}
