"""The hub daemon: operator API, tokens, agent registry and signed dispatch to spokes."""
