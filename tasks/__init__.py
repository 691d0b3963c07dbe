"""Task families. Each module registers its tasks under its queue's name prefix."""
