"""Residency planning: the ledger that counts bytes and the pure planner that decides residency."""
