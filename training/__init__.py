"""The offline `train_benchmark` package that reproduces the paper's seven-model benchmark."""
