"""The `croupier shards ...` commands: argument parsing and printing over the shards library.

`dispatch` gathers the sub-commands; each `*_cli` module registers one or two of them and
calls the library (`croupier.shards.build`, `croupier.shards.scoring`, `croupier.shards.summary`, ...)
for the work. Library code never imports these modules.
"""
