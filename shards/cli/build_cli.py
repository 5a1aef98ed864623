"""`croupier shards build`: the command-line face of the build (`croupier.shards.build.engines.build_with`)."""

from __future__ import annotations

import argparse
import sys

from croupier.values import parse_size


def register(sub: argparse._SubParsersAction) -> None:
    from croupier.format.sidecar import LAYOUTS
    from croupier.shards.build.engines import ENGINES

    p = sub.add_parser(
        "build", help="write MDS shards, embed, cluster and write the cluster sidecar",
        description="Build an MDS dataset with a cluster sidecar from JSON lines (plain/.gz/.zst), "
                    "Parquet and folders of .txt files, or --adopt an existing MDS dataset. "
                    "An interrupted build resumes where it stopped when run again with the same arguments.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="JSONL/Parquet files or folders, or token corpora: Megatron .idx (with its .bin) or "
                        "OLMo-style .npy token arrays (each document one sample with a token column, no text)")
    p.add_argument("--out", help="output folder or object-store URL such as s3://bucket/prefix "
                                 "(for --adopt: where the sidecar goes; default: in place)")
    p.add_argument("--work-dir", default=None,
                   help="local folder for the resumable work when --out is an object store")
    p.add_argument("--adopt", metavar="MDS_DIR_OR_REMOTE",
                   help="write a sidecar for an existing MDS dataset without rewriting it")
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    p.add_argument("--keep-fields", default="", help="comma-separated fields kept as MDS columns")
    p.add_argument("--no-tail-check", action="store_true",
                   help="skip the check, after the build, of how balancing its clusters would deal the rare groups "
                        "of each kept field (it reads the kept columns once)")
    p.add_argument("--embedder", default="minilm", metavar="NAME_OR_PATH",
                   help="minilm (all-MiniLM-L6-v2, default), hashing (fast, model-free), a local "
                        "sentence-transformers model folder (loaded offline; its name and hash are recorded), "
                        "or none (with --group-by FIELD and one cluster per value: nothing is embedded)")
    p.add_argument("--embeddings", default=None, metavar="FILE_OR_FIELD",
                   help="your own embeddings instead of an embedder: a .npy (N, dim) float array in input order, "
                        "a .parquet file's list column (--embeddings-column), or a list field of the records; "
                        "stored float16, their file name and SHA-256 (or field) recorded in the sidecar")
    p.add_argument("--embeddings-column", default=None, metavar="COLUMN",
                   help="with --embeddings FILE.parquet: the column holding the vectors (default embedding)")
    p.add_argument("--embeddings-key", default=None, metavar="FIELD",
                   help="with --embeddings FILE.parquet: a column of the file that must equal this field of the "
                        "records row by row (refuses a file in another order)")
    p.add_argument("--clusters", type=int, default=None, help="K (default: about sqrt(N), at most 1024)")
    p.add_argument("--group-by", default=None, metavar="FIELD",
                   help="a metadata field of the records (source, domain, language...) as the first level of the "
                        "clustering: one cluster per group by default, so rare groups stay clusters of their own "
                        "(the field is kept as a column and recorded per sample in the sidecar)")
    p.add_argument("--clusters-per-group", type=int, default=None, metavar="N",
                   help="with --group-by: k-means into N clusters inside each group (at most its documents)")
    p.add_argument("--cluster-size", type=int, default=None, metavar="M",
                   help="with --group-by: k-means inside each group into about one cluster per M documents")
    p.add_argument("--min-cluster-size", type=int, default=None, metavar="S",
                   help="with --clusters-per-group or --cluster-size: fold a group's clusters under S documents into "
                        "the nearest cluster of the same group (never across groups)")
    p.add_argument("--embed-cache", default=None, metavar="DIR",
                   help="folder of embeddings kept across builds: a build whose texts (in order) and embedder "
                        "match a stored matrix copies it instead of embedding again (a sweep over clustering "
                        "settings embeds once); local engine only")
    p.add_argument("--layout", default=None, choices=LAYOUTS,
                   help="cluster-major (default; rewrites shards cluster by cluster) or original "
                        "(input order; the only choice with --adopt)")
    p.add_argument("--shard-size", default="64MiB", help="MDS shard size limit (default 64MiB)")
    p.add_argument("--compression", default="zstd", help="MDS shard compression (default zstd; 'none' for none)")
    p.add_argument("--seed", type=int, default=0, help="k-means (and hashing embedder) seed")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations (default 20)")
    p.add_argument("--train-sample", type=int, default=262_144,
                   help="at most this many documents train k-means (default 262144)")
    p.add_argument("--chunk", type=int, default=8192, help="documents per embedding chunk (resume unit)")
    p.add_argument("--batch-size", type=int, default=64, help="sentence-model batch size")
    p.add_argument("--device", default=None, help="embedding device (default: cuda when available)")
    p.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                   help="store token ids (int32) in --token-field so training need not tokenize; with --adopt "
                        "of a dataset holding only a token column, decode it for embedding")
    p.add_argument("--token-field", default="tokens", help="token column name (default: tokens)")
    p.add_argument("--eos-id", type=int, default=None, metavar="N",
                   help="with .npy token-array inputs (OLMo style): the end-of-document token; every document "
                        "ends with it")
    p.add_argument("--token-dtype", default="uint16",
                   help="with raw (headerless) .npy token arrays: the ids' dtype (default uint16; a NumPy .npy "
                        "file carries its own)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    eng = p.add_argument_group("engine")
    eng.add_argument("--engine", default="local", choices=ENGINES,
                     help="local (default: one process) or ray (Ray Data: parallel ingest, embedding actors, "
                          "parallel assignment and shard writers; the same dataset)")
    eng.add_argument("--ray-address", default=None,
                     help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray instance)")
    eng.add_argument("--ray-workers", type=int, default=None,
                     help="embedding actors and parallel tasks (default: the cluster's CPUs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from croupier.shards.build.config import BuildConfig
    from croupier.shards.build.engines import build_with

    keep = tuple(f.strip() for f in args.keep_fields.split(",") if f.strip())
    layout = args.layout or ("original" if args.adopt else "cluster-major")
    cfg = BuildConfig(
        out=args.out, inputs=tuple(args.inputs), adopt=args.adopt, text_field=args.text_field,
        keep_fields=keep, embedder=args.embedder, clusters=args.clusters, layout=layout,
        shard_size=parse_size(args.shard_size),
        compression=None if args.compression.lower() == "none" else args.compression,
        seed=args.seed, niter=args.niter, max_train=args.train_sample, chunk=args.chunk,
        batch_size=args.batch_size, skip_bad=args.skip_bad, overwrite=args.overwrite,
        device=args.device, progress=not args.quiet, tokenizer=args.tokenizer, token_field=args.token_field,
        work_dir=args.work_dir, group_by=args.group_by, clusters_per_group=args.clusters_per_group,
        cluster_size=args.cluster_size, min_cluster_size=args.min_cluster_size, embed_cache=args.embed_cache,
        embeddings=args.embeddings, embeddings_column=args.embeddings_column, embeddings_key=args.embeddings_key,
        eos_id=args.eos_id, token_dtype=args.token_dtype)
    res = build_with(cfg, args.engine, ray_address=args.ray_address, ray_workers=args.ray_workers)
    print(f"{res.out}: {res.num_samples} documents, {res.num_clusters} clusters, layout {res.layout}, "
          f"fingerprint {res.fingerprint}" + (f", {res.skipped} bad records skipped" if res.skipped else ""))
    if cfg.keep_fields and not args.no_tail_check:
        from croupier.shards.tail_check import after_build

        for line in after_build(str(res.out), cfg.keep_fields):
            print(line)
    sys.stdout.flush()
    return 0
