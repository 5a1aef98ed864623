"""The build's stages: the ones every engine shares, and the local engine's own.

- `ingest`: the inputs into text parts (local), or an adopted dataset's size;
- `embed`: the embedding matrix, chunk by chunk (local), with the embeddings cache;
- `kmeans`: K, the centroids' training, the assignment in chunks (local);
- `groups`: with --group-by, the groups' codes and the clusters inside each group;
- `order`: the cluster order (empty clusters dropped);
- `write`: MDS shards in the cluster order (local), and the writing both engines share;
- `arrays`: the sidecar's per-sample arrays in the new id order;
- `tokens`: an adopted dataset's token counts;
- `sidecar`: the manifest, written last (not a resumable stage: it ends the build).

The Ray engine's implementations are in `croupier.shards.build.ray_stages`.
"""
