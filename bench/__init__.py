"""croupier's benchmarks and training studies, in three parts.

    bench/benchmarks/  the benchmarks: each bench_<topic>.py measures one part of croupier
                       against a named reference in the same run and reports the ratio;
                       `python -m bench` discovers and runs them all (`--list` names them),
                       each also runs alone as `python -m bench.benchmarks.bench_<topic>`
    bench/common/      helpers they share (the row table, shard data, step inbox, the
                       transport floor server, the natural docstring corpus)
    bench/studies/     the long training studies and their shared harness; entry points
                       `python -m bench.train_compare` and `python -m bench.train_natural`

Imports go one way: benchmarks and studies use common, common uses neither, and no module
here imports another in a circle (tests/unit/test_bench_layout.py checks it).
"""
