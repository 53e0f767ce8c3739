"""The attack suite: hostile input, floods and faults against the real parts (see README)."""
