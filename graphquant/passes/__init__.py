"""One module per pass; each registers itself by name (see graphquant.pipeline)."""
