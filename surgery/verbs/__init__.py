"""The public verbs: thin functions over the graph, numerics, data and engines."""
