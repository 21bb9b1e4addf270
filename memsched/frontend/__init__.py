"""Capture: a model and example inputs become an ATen-level fx graph (``capture.py``), or one
graph holding a training step's forward and backward (``joint.py``)."""
