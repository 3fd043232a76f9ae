"""Training: the Lightning module, schedules, callbacks and the ``pretrain`` entry point."""
