"""The markdown findings report, its plots, provenance and the rows sweep."""
