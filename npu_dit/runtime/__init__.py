"""Runtime: inner compilers, process groups and collectives, the executor, cache state."""
