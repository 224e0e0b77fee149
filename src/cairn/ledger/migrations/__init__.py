"""Alembic migrations of the ledger schema (applied in-process by :mod:`cairn.ledger.db`)."""
