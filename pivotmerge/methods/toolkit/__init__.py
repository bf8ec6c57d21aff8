"""The method author's toolkit: small, pure, vectorised tensor operations, one concern per module.

* `deltas`: task deltas ``W_k - W0``, their weighted sums, and putting an update back on the base;
* `pieces`: walking a flat tensor in fixed-size pieces;
* `sparsify`: TIES' exact magnitude trim and DARE's random drop;
* `consensus`: TIES' sign election and disjoint merge;
* `svd`: truncated SVDs routed by cost (exact or randomized), with the choice recorded;
* `spectrum`: numerically nonzero singular values, energy ranks, Iso-C's flattened spectrum.

A method imports what it uses by module, e.g.
``from pivotmerge.methods.toolkit.deltas import add_weighted_deltas``. These modules import
only torch (and each other), so any method may use them.
"""
