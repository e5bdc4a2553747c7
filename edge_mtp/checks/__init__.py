"""What proves a finished bundle and reports on a checkpoint: validate, reference, weights, inspect."""
