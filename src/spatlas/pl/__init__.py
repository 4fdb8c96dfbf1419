"""spatlas.pl."""
