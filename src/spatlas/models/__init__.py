"""spatlas.models."""
