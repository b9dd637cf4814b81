"""BN numerics: exact moments, identity weights, the checks of their values, and
the affine algebra of folding.
"""
