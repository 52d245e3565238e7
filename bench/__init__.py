"""Benchmarks of the service, one module per question, each run from the repository root as
`python -m bench.<module> --help` (bench.bench: latency and throughput of the engine and the HTTP server;
bench.readme_table: the tables printed from one results file). Results go to bench/results/."""
