"""Alembic environment: always run online on the connection cairn hands over (no alembic.ini)."""

from alembic import context

from cairn.ledger.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
