"""Analysis without merging: weight-distance metrics between the models a spec names (folding is pivotmerge.fold).

May import: plan, methods, spec, errors, progress."""
