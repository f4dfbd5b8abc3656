"""The `import tilemem as TM` planning SDK (filled in by the placement work)."""

__all__: list[str] = []
