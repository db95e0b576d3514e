"""The composition root: builds every part from the config with explicit constructor
arguments, runs a worker (startup -> serve -> drain), supervises workers, owns metrics."""
