"""The spoke daemon: command API, scope checks, process supervisor, templates."""
