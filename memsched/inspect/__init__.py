"""Inspection of plans: rows, plots, notebook display, and saving/loading as JSON."""
