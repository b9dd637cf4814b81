"""Engines that run a pass over the data: in this process, or on a Ray cluster."""
