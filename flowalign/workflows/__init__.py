"""Workflows that chain the lower layers: sample -> score -> pair (``flowalign.workflows.pairs``)."""
