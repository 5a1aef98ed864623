"""Helpers the benchmarks and the training studies share; nothing here is a benchmark or a study.

    table           `format_table`: the fixed-width table of benchmark rows every runner prints
    shard_data      a cluster-major MDS dataset, read orders and a slow local "remote"
    step_inbox      what a simulated consumer has received, stamped on arrival
    floor_server    the transport floor server of bench_server_load (`python -m bench.common.floor_server`)
    natural_corpus  the offline natural long-tailed corpus: docstrings of the installed packages

Modules here import only croupier and third-party packages, never `bench.benchmarks` or
`bench.studies`, so either part can use them without an import circle.
"""
