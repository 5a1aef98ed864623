"""croupier.shards.scoring: per-sample scores of a built dataset and the subsets selected by them.

- `density`, `askllm`, `askllm_http`, `perplexity`: the scorers (sketch density of the
  embeddings, Ask-LLM with a local model or an endpoint, a small causal LM's perplexity);
- `lm_scores`: the resumable chunked run and the MDS text reader they share;
- `scorers`: a whole scoring run, stored as a sidecar score column; `ray_score`,
  `ray_lm_score`: the same runs on Ray;
- `select`: the selectors as pure functions; `subset`: a selection stored in the sidecar.
"""
