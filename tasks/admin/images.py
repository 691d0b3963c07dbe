"""Admin for the images family."""
