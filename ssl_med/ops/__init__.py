"""Sequence-mixing operators in plain PyTorch (mLSTM, selective scan)."""
