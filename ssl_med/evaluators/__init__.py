"""Evaluators of frozen or fine-tuned encoders, registered in ``ssl_med.registry.EVALUATORS``."""
