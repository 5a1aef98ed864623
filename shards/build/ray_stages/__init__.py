"""The Ray engine's stages: ingest, embed, assign and write on a Ray cluster.

Each is a `croupier.shards.build.stage.Stage` with the local stage's name and outputs, so the
stages both engines share (k-means training, grouping, order, arrays, sidecar) run after
them unchanged. `session.RaySession` is the cluster connection they share;
`croupier.shards.build.ray_builder` puts them together as the `RayEngine`.
"""
