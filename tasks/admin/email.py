"""Admin for the email family."""
