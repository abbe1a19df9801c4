"""Small utilities: progress bars, logging helpers."""
