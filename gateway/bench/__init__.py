"""Gateway overhead benchmark (`make bench-gateway`): mock upstream, wrk scripts, side-by-side runner."""
