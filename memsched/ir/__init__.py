"""The IR's vocabulary, the bottom layer: inserted ops and their handler registry (ops),
tiers, kinds and links (kinds), the facts kept on nodes (meta), tensor and storage helpers
(tensors), the device-memory walk (memory) and the listing (listing). Imports nothing else
of memsched."""
