"""Plans in files: ``serialize`` writes and reads the versioned JSON, ``reapply`` rebuilds a
saved schedule on a fresh capture of the model."""
