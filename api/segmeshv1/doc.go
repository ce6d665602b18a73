// Package segmeshv1 holds the generated protobuf messages of the segmesh wire API
// (api/segmesh/v1/segmesh.proto); segmeshv1connect holds the Connect clients and
// handlers. Regenerate with api/gen.sh.
package segmeshv1
