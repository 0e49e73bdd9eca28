"""Delivery: the outbox of QC outputs and the C-STORE SCU that empties it."""
