"""job labels; deleted_at for jobs whose artifacts were deleted or expired

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_labels',
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('key', sa.String(length=63), nullable=False),
    sa.Column('value', sa.String(length=63), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'key')
    )
    op.create_index('ix_job_labels_key_value', 'job_labels', ['key', 'value'], unique=False)
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.add_column(sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.drop_column('deleted_at')
    op.drop_index('ix_job_labels_key_value', table_name='job_labels')
    op.drop_table('job_labels')
