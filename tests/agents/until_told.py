"""Test agent: waits until a file named `exit` appears in its working folder, then exits
with the code written in it. Writes `started` there once it runs."""

import pathlib
import sys
import time

pathlib.Path("started").write_text("yes")
told = pathlib.Path("exit")
while not told.exists():
    time.sleep(0.05)
print("told to exit with", told.read_text().strip(), flush=True)
sys.exit(int(told.read_text()))
