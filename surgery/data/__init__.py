"""Data: whatever the user passes, turned into batches (sources on disk, prefetch, preprocessing)."""
