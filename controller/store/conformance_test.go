package store_test

import (
	"path/filepath"
	"testing"

	"segmesh/controller/store"
	"segmesh/controller/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) (store.Store, func() store.Store) {
		path := filepath.Join(t.TempDir(), "controller.db")
		open := func() store.Store {
			s, err := store.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
		s := open()
		t.Cleanup(func() { _ = s.Close() })
		return s, func() store.Store {
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = open()
			return s
		}
	})
}

func TestUndecodableRevision(t *testing.T) {
	s, err := store.Open(filepath.Join(t.TempDir(), "controller.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	storetest.UndecodableRevision(t, s, func(rev uint64, raw []byte) error { return store.PutPolicyRecord(s, rev, raw) })
}
