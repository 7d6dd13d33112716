// Package layering holds no code: its test asserts the layering rules of
// README.md (Layout) on the real import graph (`go list`), so that an
// import that breaks them fails `go test ./...` instead of being noticed
// in a binary's size.
package layering
