"""team queues: jobs wait in the database for the fair-share dispatcher

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('teams', sa.Column('weight', sa.Float(), server_default='1', nullable=False))
    op.add_column('teams', sa.Column('max_running_jobs', sa.Integer(), nullable=True))
    op.add_column('jobs', sa.Column('priority', sa.Integer(), server_default='0', nullable=False))
    op.add_column('jobs', sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('deployment', sa.String(length=255), server_default='', nullable=False))
    op.add_column('worker_heartbeats',
                  sa.Column('deployment', sa.String(length=255), server_default='', nullable=False))
    op.create_index('ix_jobs_state_team', 'jobs', ['state', 'team_id'], unique=False)
    op.create_index('ix_jobs_finished', 'jobs', ['finished_at'], unique=False)
    # Jobs queued before this revision were sent to the broker when they were accepted.
    op.execute("UPDATE jobs SET dispatched_at = created_at, sent_at = created_at WHERE state = 'queued'")


def downgrade() -> None:
    # Waiting jobs were never sent: without the dispatcher nothing would run them.
    op.execute("UPDATE jobs SET state = 'failed', error = 'the service was downgraded before the job was dispatched', "
               "finished_at = CURRENT_TIMESTAMP WHERE state = 'waiting'")
    op.drop_index('ix_jobs_finished', table_name='jobs')
    op.drop_index('ix_jobs_state_team', table_name='jobs')
    op.drop_column('worker_heartbeats', 'deployment')
    op.drop_column('jobs', 'deployment')
    op.drop_column('jobs', 'sent_at')
    op.drop_column('jobs', 'dispatched_at')
    op.drop_column('jobs', 'priority')
    op.drop_column('teams', 'max_running_jobs')
    op.drop_column('teams', 'weight')
