"""Image embeddings: robust decoding, open_clip and copy-detection models, the embedding stage."""
