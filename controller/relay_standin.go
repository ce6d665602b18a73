package controller

import (
	"segmesh/api/segmeshv1"
	"segmesh/controller/store"
)

// TODO(i10-ctl): stand-ins until branch i10-ctl is merged; delete this file then.

func (c *Controller) push(node, feature string, u *segmeshv1.NetmapUpdate) bool { return false }

func (c *Controller) streamHas(node, feature string) bool { return false }

type standinCandidate struct{ Endpoint, Kind string }

func nodeCandidates(n store.Node) []standinCandidate { return nil }
