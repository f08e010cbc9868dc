"""One module per network: the paper's network and its six comparators."""
