"""Development tooling: the embedded broker and the one-command stack (bin/run). Not deployed."""
