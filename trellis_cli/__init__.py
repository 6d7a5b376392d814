"""The `trellis` command and the tooling a user runs: kernel cases and benchmarks, the sm_90 compile
check, the code benchmark, and the serve-process harness of the end-to-end tests and benchmarks.

It sits above every other package; `qat` and `server` are imported inside the command that needs
them, so `trellis serve` never loads training code."""
