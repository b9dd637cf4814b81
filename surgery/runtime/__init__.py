"""The process around the work: CPU kind, quiet imports, the progress bar."""
