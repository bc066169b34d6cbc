"""Tools around the library: benchmarks and the allocator switch."""
