"""indexes for the administration queries: studies by arrival, a study's latest findings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_studies_first_received", "studies", ["first_received_at", "id"])
    op.create_index("ix_findings_study_job", "findings", ["study_id", "job_id"])


def downgrade() -> None:
    op.drop_index("ix_findings_study_job", table_name="findings")
    op.drop_index("ix_studies_first_received", table_name="studies")
