"""`ntm bench`: side-by-side benchmarks of the tunnel, its set-up and the DC (issue 7)."""
