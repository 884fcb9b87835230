"""The embeddings runtime: BERT-family encoders behind /v1/embeddings and /embed (see serving.py)."""
