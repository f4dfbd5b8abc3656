"""TileMEM: run and serve Mixture-of-Experts models across memory tiers, tile by tile."""

__version__ = "0.1.0"
