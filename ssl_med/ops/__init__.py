"""Sequence-mixing operators: mLSTM and the selective scan (PyTorch, plus a fused C++ CPU kernel built on first use)."""
