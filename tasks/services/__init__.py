"""The work itself, as plain functions: the tasks in tasks/<family>.py are thin wrappers over these."""
