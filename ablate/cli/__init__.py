"""The `ablate` command line."""
