"""BN numerics: exact moments, identity weights, and the checks of their values."""
