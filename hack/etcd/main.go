// Command etcd is the real etcd server (go.etcd.io/etcd/server/v3/etcdmain, at the
// version go.mod requires), built from the project's own module.
//
// It exists so that CI, the netns lab (test/lab) and `make demo-ha` run a genuine
// etcd cluster for the controller's etcd store without downloading an etcd
// release: `go build ./hack/etcd` (lab.Build does it) is the whole installation,
// and the server is exactly the one the store's client was tested against. It
// takes etcd's own flags and environment variables (see `etcd --help`); nothing
// of segmesh is added.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
