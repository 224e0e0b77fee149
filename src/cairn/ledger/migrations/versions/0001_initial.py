"""Initial ledger schema: meta, releases, contributions, probes, evaluations.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.JSON, nullable=False),
    )
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("artifact_sha", sa.String(64), nullable=True),
        sa.Column("artifact_kind", sa.String(16), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("gate", sa.JSON, nullable=True),
        sa.Column("settings", sa.JSON, nullable=True),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "contributions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("contributor", sa.String(128), nullable=False),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("release_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("method", sa.JSON, nullable=True),
        sa.Column("data_fingerprint", sa.JSON, nullable=True),
        sa.Column("artifact_sha", sa.String(64), nullable=True),
        sa.Column("artifact_kind", sa.String(16), nullable=True),
        sa.Column("wall_seconds", sa.Float, nullable=True),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "probes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("contribution_id", sa.Integer, sa.ForeignKey("contributions.id"), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("sha", sa.String(64), nullable=False),
        sa.Column("n_items", sa.Integer, nullable=False),
    )
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("release_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("probe_id", sa.Integer, sa.ForeignKey("probes.id"), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("item_scores", sa.JSON, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.UniqueConstraint("release_id", "probe_id", name="uq_evaluation"),
    )


def downgrade() -> None:
    for table in ("evaluations", "probes", "contributions", "releases", "meta"):
        op.drop_table(table)
