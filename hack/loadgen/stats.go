package main

import (
	"slices"
	"time"
)

// percentile returns the p-th percentile (0 < p <= 100) of v by the nearest-rank
// method (the smallest value with at least p% of the values at or below it); 0
// for an empty v. v is not modified.
func percentile[T int64 | time.Duration](v []T, p float64) T {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	rank := int(p/100*float64(len(s)) + 0.999999999)
	rank = min(max(rank, 1), len(s))
	return s[rank-1]
}

// byteDeltas returns after[i]-before[i] for every agent, the bytes each received
// between two snapshots.
func byteDeltas(before, after []int64) []int64 {
	d := make([]int64, min(len(before), len(after)))
	for i := range d {
		d[i] = after[i] - before[i]
	}
	return d
}

// snapshotBytes reads every agent's received-byte counter.
func (f *fleet) snapshotBytes() []int64 {
	s := make([]int64, len(f.agents))
	for i, a := range f.agents {
		s[i] = a.bytes.Load()
	}
	return s
}
