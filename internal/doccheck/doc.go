// Package doccheck holds tests that keep README.md true to the binaries:
// every message its troubleshooting table quotes must be one the code can
// print. It has no code of its own.
package doccheck
