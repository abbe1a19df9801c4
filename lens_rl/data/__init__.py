"""Data: offline corpora and (later) activation datasets."""
