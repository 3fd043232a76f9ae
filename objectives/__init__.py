"""Pretraining objectives: one module per method, each registered by name in ``ssl_med.registry.OBJECTIVES``.

Every objective subclasses :class:`ssl_med.objective.Objective`: it owns its views, heads, teacher
and loss. Add one by writing ``objectives/<name>.py`` with ``@OBJECTIVES.register("<name>")`` and
``conf/objective/<name>.yaml``.
"""
