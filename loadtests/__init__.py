"""geogate loadtests: load generator, benchmarks against peers, chaos scenarios."""
