"""Test agent: prints its argv and exits with the code it is given."""

import sys

print("args:", sys.argv[1:], flush=True)
sys.exit(int(sys.argv[1]))
