"""pplex's worker conformance suite: does a worker keep the contract of proto/upstream.proto?

    python -m conformance --upstream-cmd "path/to/worker --port {port}"

starts pplex and the worker on free loopback ports, runs every scenario
(`conformance.scenarios`), prints a table and exits non-zero on a failure.
`conformance.runner.run_suite` is the same, for programs (tests/e2e).
See conformance/README.md.
"""
