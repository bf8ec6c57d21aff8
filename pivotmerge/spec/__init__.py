"""Stage 1, the spec: what the user asks for (the merge spec schema, mergekit configs read as specs).

May import: pivotmerge.errors. Nothing of the later stages."""
