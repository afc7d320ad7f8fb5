"""Small, fast toy backbones for testing and benchmarking TDM end to end on CPU."""
