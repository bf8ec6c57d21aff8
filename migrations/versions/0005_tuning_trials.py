"""tuning jobs and their trials

Jobs of kind 'tuning' need no change to `jobs`: its kind is a VARCHAR(16) without a
constraint (service_core.models._enum), so the new kind is only a new value.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('trials',
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=64), nullable=False),
    sa.Column('method', sa.String(length=64), nullable=False),
    sa.Column('params', JSON, nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('objective', sa.Float(), nullable=True),
    sa.Column('dev', JSON, nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('merge_s', sa.Float(), nullable=True),
    sa.Column('evaluate_s', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'number')
    )


def downgrade() -> None:
    # The older code cannot read a job of kind 'tuning'; such jobs go, with their rows (ON DELETE CASCADE).
    op.execute("DELETE FROM jobs WHERE kind = 'tuning'")
    op.drop_table('trials')
