"""Load tests and benchmarks of the hub; outside the package, never imported by hub/."""
