"""split parts as rows

A split merge's parts were Celery tasks of a second app, followed through its result backend;
they are now rows with a lease, sent on the main app as tuning trials are.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('split_parts',
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('part', sa.Integer(), nullable=False),
    sa.Column('job_attempt', sa.Integer(), nullable=False),
    sa.Column('shards', JSON, nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('task_id', sa.String(length=255), nullable=True),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.Column('starts', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('done', sa.Integer(), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('result', JSON, nullable=True),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'part')
    )


def downgrade() -> None:
    op.drop_table('split_parts')
