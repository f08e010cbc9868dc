"""Building blocks and backbones shared by the networks."""
