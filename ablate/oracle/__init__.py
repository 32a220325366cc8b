"""The oracle: teacher pass, PCA, sidecar, its files, n-gram hashing and tokenizer identity."""
