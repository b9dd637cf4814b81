"""Channel pruning: which channels go, what they take with them, and what it saves."""
