"""The jobs the commands run, as library functions."""
