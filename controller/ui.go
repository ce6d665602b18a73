package controller

import (
	"embed"
	"io/fs"
	"net/http"
)

// The status page.
//
// The controller serves a read-only status page at /ui/ (and redirects / there).
// The page is static and holds no data: it asks for an operator token, keeps it
// in the tab's sessionStorage (never in a cookie, so no request carries it
// unless the page's own script adds it, and never in a URL), and calls
// OperatorService over Connect's JSON protocol with "Authorization: Bearer
// TOKEN". Every authorization decision thus stays in withOperatorAuth; a viewer
// credential is enough. Without a cookie there is no ambient credential, so the
// API needs no CSRF defence beyond what it already has.

// UIPath is where the controller serves the status page.
const UIPath = "/ui/"

//go:embed ui
var uiFiles embed.FS

// uiSecurityHeaders are set on every response of the status page: scripts,
// styles, images and API calls only from the controller itself, no inline
// script or style, no framing, no MIME sniffing, no referrer, no plugins, and a
// window of its own.
var uiSecurityHeaders = map[string]string{
	"Content-Security-Policy":      "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
	"X-Content-Type-Options":       "nosniff",
	"Referrer-Policy":              "no-referrer",
	"X-Frame-Options":              "DENY",
	"Cross-Origin-Opener-Policy":   "same-origin",
	"Cross-Origin-Resource-Policy": "same-origin",
	"Permissions-Policy":           "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
	// The files are small and change with the binary: revalidate each time.
	"Cache-Control": "no-cache",
}

// uiHandler serves the embedded status page under UIPath (GET and HEAD only)
// with uiSecurityHeaders, and redirects "/" to it.
func uiHandler() http.Handler {
	sub, err := fs.Sub(uiFiles, "ui")
	if err != nil {
		panic(err) // the directory is embedded: cannot happen
	}
	files := http.StripPrefix(UIPath, http.FileServerFS(sub))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		for k, v := range uiSecurityHeaders {
			h.Set(k, v)
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			h.Set("Allow", "GET, HEAD")
			http.Error(w, "the status page is read-only: GET or HEAD", http.StatusMethodNotAllowed)
			return
		}
		if r.URL.Path == "/" {
			http.Redirect(w, r, UIPath, http.StatusFound)
			return
		}
		files.ServeHTTP(w, r)
	})
}
