"""What a notebook imports: clusters, load generation, experiments."""
