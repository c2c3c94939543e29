"""Test agent: a bounded fork bomb. Tries to start 200 sleeping children, counts how
many the system allowed, writes the count to forked.txt, then waits."""

import os
import time

started = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        started += 1
    except OSError:
        pass  # refused: the process limit holds
with open("forked.txt.tmp", "w") as f:
    f.write(str(started))
os.rename("forked.txt.tmp", "forked.txt")
print(f"started {started} children", flush=True)
time.sleep(120)
