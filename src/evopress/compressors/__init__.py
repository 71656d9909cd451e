"""Per-layer compressors that turn one dense weight into a database of compression levels."""
