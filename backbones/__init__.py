"""Backbones (encoders): one module per family, each registered by name in ``ssl_med.registry.BACKBONES``.

Every backbone implements :class:`ssl_med.encoder.Encoder`; most subclass the shared
:class:`ssl_med.encoder.TokenEncoder` skeleton. Add one by writing ``backbones/<name>.py`` with
``@BACKBONES.register("<name>")`` and ``conf/backbone/<name>.yaml``.
"""
