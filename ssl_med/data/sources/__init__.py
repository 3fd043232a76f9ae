"""Data sources: each resolves ``data.source`` to a ready image store (``ssl_med.registry.SOURCES``)."""
