"""How the shipped models were trained: not part of the installed package (docs/training.md)."""
