"""What the demo, the tests and the benchmarks start: the embedded store, the reference
algorithm service and the camera simulator."""
