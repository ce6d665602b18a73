// Package yamlpos finds where a node of a goccy/go-yaml AST starts, for errors
// that say file:line:col. The policy parser and the daemons' configuration files
// share it.
package yamlpos

import "github.com/goccy/go-yaml/ast"

// Of returns the 1-based line and column where n starts; for a mapping, where its
// first key starts. ok is false when n carries no position (nil, or an empty
// node the parser made up).
func Of(n ast.Node) (line, col int, ok bool) {
	switch v := n.(type) {
	case *ast.MappingNode:
		if len(v.Values) > 0 {
			return Of(v.Values[0].Key)
		}
	case *ast.MappingValueNode:
		return Of(v.Key)
	}
	if n != nil {
		if tk := n.GetToken(); tk != nil && tk.Position != nil {
			return tk.Position.Line, tk.Position.Column, true
		}
	}
	return 0, 0, false
}

// Kind names the YAML type of n for error messages: "a mapping", "a list", "a
// string", "an integer", "a number", "a boolean", "nothing" or "an unsupported
// YAML value".
func Kind(n ast.Node) string {
	switch n.(type) {
	case *ast.MappingNode, *ast.MappingValueNode:
		return "a mapping"
	case *ast.SequenceNode:
		return "a list"
	case *ast.StringNode, *ast.LiteralNode:
		return "a string"
	case *ast.IntegerNode:
		return "an integer"
	case *ast.FloatNode, *ast.InfinityNode, *ast.NanNode:
		return "a number"
	case *ast.BoolNode:
		return "a boolean"
	case *ast.NullNode:
		return "nothing"
	}
	return "an unsupported YAML value"
}
