"""Code both Fleetwire daemons use: identity, envelope, errors, scope, storage, config."""

import os

# gRPC's C core reads this once, when grpc is first imported (every Fleetwire program
# imports this package before grpc). Left unset, the core writes its own plain-text INFO
# lines (each failed TLS handshake, say) to stderr between a daemon's JSON log lines.
# Its errors still come through; a GRPC_VERBOSITY set by the user wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
