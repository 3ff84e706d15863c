"""Pure simulation library: hardware, step timing, one engine's scheduler, workloads, clusters, metrics."""
