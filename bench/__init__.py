"""croupier's benchmarks: `python -m bench` runs them all; each bench_<topic>.py also runs alone."""
