"""what the drift watch reads and keeps: each instance's scanner and acquisition values, each finding's
out-of-distribution score, and the drift checks per scanner group with their history

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("scanner", sa.String(200), nullable=True))
        batch.add_column(sa.Column("acquisition", sa.JSON(), nullable=True))
    op.create_index("ix_instances_scanner_received", "instances", ["scanner", "received_at"])
    with op.batch_alter_table("findings") as batch:
        batch.add_column(sa.Column("ood_score", sa.Float(), nullable=True))
    op.create_table(
        "drift_checks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("scanner", sa.String(200), nullable=False),
        sa.Column("checked_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("signals", sa.JSON(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
    )
    op.create_index("ix_drift_checks_scanner_at", "drift_checks", ["scanner", "checked_at"])


def downgrade() -> None:
    op.drop_index("ix_drift_checks_scanner_at", table_name="drift_checks")
    op.drop_table("drift_checks")
    with op.batch_alter_table("findings") as batch:
        batch.drop_column("ood_score")
    op.drop_index("ix_instances_scanner_received", table_name="instances")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("acquisition")
        batch.drop_column("scanner")
