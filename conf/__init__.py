"""Hydra config tree of ssl_med (installed as the package ``ssl_med.conf``)."""
