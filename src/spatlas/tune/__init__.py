"""spatlas.tune."""
