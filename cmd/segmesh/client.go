package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1/segmeshv1connect"
)

// credentials is the operator credential file written by the controller.
type credentials struct {
	Controller string `json:"controller"`
	CAPEM      string `json:"ca_pem"`
	Token      string `json:"token"`
}

// controllerServerName is the DNS name every controller certificate carries.
const controllerServerName = "segmesh-controller"

// requestTimeout bounds each operator call.
const requestTimeout = 30 * time.Second

func loadCredentials(g *globalFlags) (credentials, error) {
	var c credentials
	if g.credentials == "" {
		return c, &exitError{code: 2, msg: "segmesh: no credentials: pass --credentials FILE (the operator.json in the controller's data directory) or set SEGMESH_CREDENTIALS"}
	}
	b, err := os.ReadFile(g.credentials)
	if err != nil {
		return c, &exitError{code: 2, msg: fmt.Sprintf("segmesh: reading credentials: %v", err)}
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s is not a credential file: %v", g.credentials, err)}
	}
	if g.controller != "" {
		c.Controller = g.controller
	}
	if c.Controller == "" || c.CAPEM == "" || c.Token == "" {
		var missing []string
		for _, f := range []struct{ name, v string }{{"controller", c.Controller}, {"ca_pem", c.CAPEM}, {"token", c.Token}} {
			if f.v == "" {
				missing = append(missing, f.name)
			}
		}
		return c, &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s lacks %s (a credential file is the controller's operator.json or one written by `segmesh operators create`)", g.credentials, strings.Join(missing, " and "))}
	}
	// The bearer credential must never travel in clear text.
	if u, err := url.Parse(c.Controller); err != nil || u.Scheme != "https" || u.Host == "" {
		return c, &exitError{code: 2, msg: fmt.Sprintf("segmesh: controller URL %q: want https://HOST:PORT (the operator credential is only sent over TLS)", c.Controller)}
	}
	return c, nil
}

// operatorClient dials the operator API with the controller CA pinned and the bearer
// credential attached to every call.
func operatorClient(g *globalFlags) (segmeshv1connect.OperatorServiceClient, error) {
	c, err := loadCredentials(g)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(c.CAPEM)) {
		return nil, &exitError{code: 2, msg: "segmesh: credential file's ca_pem holds no certificate"}
	}
	httpClient := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool, ServerName: controllerServerName, MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2: true,
	}}
	auth := connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			req.Header().Set("Authorization", "Bearer "+c.Token)
			return next(ctx, req)
		}
	})
	return segmeshv1connect.NewOperatorServiceClient(httpClient, strings.TrimRight(c.Controller, "/"),
		connect.WithInterceptors(auth)), nil
}

// callError turns an RPC error into an exitError. A refusal (the input is invalid,
// the object does not exist or is in the wrong state, the credential's role does
// not allow the change) exits 1; a connection or credential problem (unreachable
// controller, unknown or revoked credential) exits 2.
func callError(what string, err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) {
		switch ce.Code() {
		case connect.CodeInvalidArgument:
			// Policy and input errors: "file:line:col: message" lines, printed as they are.
			return &exitError{code: 1, msg: ce.Message()}
		case connect.CodeFailedPrecondition, connect.CodeAlreadyExists, connect.CodeNotFound:
			return &exitError{code: 1, msg: fmt.Sprintf("segmesh: %s: %s", what, ce.Message())}
		case connect.CodePermissionDenied:
			return &exitError{code: 1, msg: fmt.Sprintf("segmesh: %s: refused, the role of this operator credential does not allow it: %s", what, ce.Message())}
		case connect.CodeUnauthenticated:
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: %s (check --credentials: the credential may be unknown to this controller or revoked)", what, ce.Message())}
		case connect.CodeUnavailable:
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: controller unreachable: %v (check --controller and that segmesh-controller runs)", what, ce.Unwrap())}
		case connect.CodeResourceExhausted:
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: the controller is busy: %s (try again shortly)", what, ce.Message())}
		}
	}
	return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: %v", what, err)}
}

// invoke makes one unary operator call: it loads the credential, dials the
// controller, calls method (a method expression such as
// segmeshv1connect.OperatorServiceClient.RevokeNode) with req under
// requestTimeout, and maps an error with callError(what, err). what says what was
// being done, e.g. "revoking node web-1".
func invoke[Req, Resp any](g *globalFlags, what string,
	method func(segmeshv1connect.OperatorServiceClient, context.Context, *connect.Request[Req]) (*connect.Response[Resp], error),
	req *Req) (*Resp, error) {
	client, err := operatorClient(g)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	resp, err := method(client, ctx, connect.NewRequest(req))
	if err != nil {
		return nil, callError(what, err)
	}
	return resp.Msg, nil
}
