"""DXA outcomes (`osteoscreen db outcomes import`): per-site T-scores and the screened study each is
matched to, for the realised performance (`db performance`) and labelled calibration rows

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

T_SCORES = ("left_hip_t_score", "right_hip_t_score", "lumbar_spine_t_score", "left_hip_neck_t_score",
            "right_hip_neck_t_score")


def upgrade() -> None:
    op.create_table(
        "outcomes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("dxa_date", sa.String(10), nullable=False),
        sa.Column("accession", sa.String(16), nullable=False),
        *(sa.Column(name, sa.Float(), nullable=True) for name in T_SCORES),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("match_status", sa.String(16), nullable=False),
        sa.Column("match_reason", sa.Text(), nullable=True),
        sa.Column("candidates", sa.Integer(), nullable=False),
        sa.Column("source_line", sa.Integer(), nullable=True),
        sa.Column("imported_by", sa.String(64), nullable=True),
        sa.Column("imported_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ux_outcomes_key", "outcomes", ["patient_id", "dxa_date", "accession"], unique=True)
    op.create_index("ix_outcomes_status", "outcomes", ["match_status"])
    op.create_index("ix_outcomes_study_uid", "outcomes", ["study_uid"])


def downgrade() -> None:
    op.drop_index("ix_outcomes_study_uid", table_name="outcomes")
    op.drop_index("ix_outcomes_status", table_name="outcomes")
    op.drop_index("ux_outcomes_key", table_name="outcomes")
    op.drop_table("outcomes")
