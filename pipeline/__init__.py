"""captioner: batch image captioning, VQA probes, embeddings and search."""

__version__ = "0.1.0"
