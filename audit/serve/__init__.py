"""The check service's Ray-free pieces (docs/serving.md): embed an image, search the reference's
index shards, verify the top candidates on pixels and label them, as the audit does; and the
HTTP request rules. ``audit.pipeline.serve_app`` places them on Ray Serve."""
