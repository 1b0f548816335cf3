"""Training loops, one module each: ``sync`` (bulk-synchronous)."""
