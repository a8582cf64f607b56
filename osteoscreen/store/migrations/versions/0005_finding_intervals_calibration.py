"""findings keep their prediction interval, the calibration that produced them and the scanner

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        batch.add_column(sa.Column("t_score_low", sa.Float(), nullable=True))
        batch.add_column(sa.Column("t_score_high", sa.Float(), nullable=True))
        batch.add_column(sa.Column("interval_level", sa.Float(), nullable=True))
        batch.add_column(sa.Column("calibration_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("scanner", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        for name in ("scanner", "calibration_id", "interval_level", "t_score_high", "t_score_low"):
            batch.drop_column(name)
