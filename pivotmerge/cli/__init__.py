"""The `pivotmerge` command line: every engine command lives here; the service adds its own
through the `pivotmerge.commands` entry-point group.

May import: everything in pivotmerge (never the service)."""
