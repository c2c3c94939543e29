"""Code both Fleetwire daemons use: identity, envelope, errors, scope, storage, config."""
