"""Development tools: the benchmark and its naive baseline, synthetic events, the local stack and an
embedded ``redis-server``. Production workers never import these."""
