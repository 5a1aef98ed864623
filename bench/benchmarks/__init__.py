"""The benchmarks: each `bench_<topic>.py` measures one part of croupier against a named reference.

Every module here exposes `run(scale) -> list[dict]`, rows of {bench, metric, value, unit,
reference, ratio, target} in which the reference is measured in the same run and the ratio
printed, and runs alone as `python -m bench.benchmarks.bench_<topic>`. `python -m bench`
discovers them in this folder by name (`bench_*`) and runs them all. Helpers they share live
in `bench.common`; the long training studies in `bench.studies`.
"""
