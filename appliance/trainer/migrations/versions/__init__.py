"""Revisions, oldest first by their ``down_revision`` chain; ids are zero-padded numbers (``0001``, ``0002``)."""
