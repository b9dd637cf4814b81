"""The graph: spot resolution, the rewrite engine, taps, tracing and fusion rules."""
