package firewall

import (
	"strings"
	"unicode/utf8"
)

// MaxComment is nft(8)'s limit on a rule comment in bytes (NFT_COMMENT_MAXLEN), so that
// a listing of the table loads again with `nft -f`.
const MaxComment = 128

// Comment returns the rule comment for a FilterRule Origin: NULs removed, invalid
// UTF-8 replaced by "?", and cut at a rune boundary to MaxComment bytes including a
// trailing "…".
func Comment(origin string) string {
	origin = strings.ToValidUTF8(strings.ReplaceAll(origin, "\x00", ""), "?")
	if len(origin) <= MaxComment {
		return origin
	}
	cut := MaxComment - len("…")
	for cut > 0 && !utf8.RuneStart(origin[cut]) {
		cut--
	}
	return origin[:cut] + "…"
}
