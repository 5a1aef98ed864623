"""The training studies: long runs that train a tiny LM once per sampler and compare held-out loss.

    harness        what the studies share: Variant, Prepared, RunResult, train_one, summarize
    train_compare  the synthetic planted-topic corpus (and its adaptive-controller variant)
    train_natural  the docstrings of the installed packages through croupier's own clusters

Each study is its own entry point (`python -m bench.train_compare`, `python -m
bench.train_natural`); both import the harness, and train_compare's `--corpus natural`
delegates to train_natural, which never imports train_compare. They are studies, not ratio
benchmarks: `python -m bench` does not run them.
"""
