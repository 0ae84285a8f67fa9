"""The global DiT family: flow matching from vision patch features to CLIP global embeddings."""
