"""Stage 1, the spec: what the user asks for (the merge spec schema, mergekit configs read as specs).

May import: methods (each method checks its own parameters), errors. Nothing of the later stages."""
