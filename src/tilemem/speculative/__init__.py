"""Speculative decoding: drafters propose up to k tokens per decoding row, the scheduler appends them to
the row's chunk, the engine's forward pass scores them and post-processing verifies them (`Speculator`)."""
