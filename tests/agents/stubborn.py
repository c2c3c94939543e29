"""Test agent that ignores SIGTERM and leaves a grandchild that escaped with setsid.

Writes agent.pid and grandchild.pid into its working folder once both are running.
"""

import os
import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = os.fork()
if child == 0:
    if os.fork() == 0:
        os.setsid()
        with open("grandchild.pid.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename("grandchild.pid.tmp", "grandchild.pid")
        while True:
            time.sleep(60)
    os._exit(0)  # the grandchild is re-parented: it escaped the agent's tree
os.waitpid(child, 0)
with open("agent.pid.tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename("agent.pid.tmp", "agent.pid")
print("stubborn agent running", flush=True)
while True:
    time.sleep(60)
