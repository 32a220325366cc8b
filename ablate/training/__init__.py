"""Training a cell: the loop, cell configs, optimiser, losses, fast paths, pretraining, compilation, bench."""
