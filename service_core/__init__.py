"""The service core shared by the API (app) and the workers: settings, database models and
sessions, the job state machine, artifact storage.

May import: pivotmerge. Never app or workers."""
