"""Plans in files: ``serialize`` writes and reads the versioned JSON (a file is data, checked
field by field against the format; nothing in it is executed or imported), ``reapply``
rebuilds a saved schedule on a fresh capture of the model."""
