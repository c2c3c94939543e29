"""Agents are the spoke's children, waited for on pidfds on the loop: no thread per
agent, exit codes as the kernel gives them, and agents that outlive the spoke's objects
for them (at a spoke's shutdown). Run in a fresh interpreter: what is measured (threads,
the open-file limit) is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

_CHILD = textwrap.dedent("""
    import asyncio, gc, json, resource, sys, threading
    from pathlib import Path
    from spoke.supervisor import AgentSupervisor, LaunchSpec, raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 512), hard))
    root = Path(sys.argv[1])

    async def main():
        limit = raise_open_file_limit()
        ended = {}

        async def on_exit(agent_id, ending):
            ended[agent_id] = ending.exit_code

        sup = AgentSupervisor(on_exit)
        threads = threading.active_count()
        for n in range(20):
            spec = LaunchSpec(agent_id=f"a{n}", argv=["/bin/sh", "-c", f"sleep 0.2; exit {n}"],
                              workdir=root / f"a{n}", log_path=root / f"a{n}.log", env={},
                              max_runtime_seconds=60, grace_seconds=1)
            sup.launch(spec)
            sup.watch(spec.agent_id)
        during = threading.active_count()
        survivor = sup.launch(LaunchSpec(
            agent_id="left", argv=["/bin/sleep", "30"], workdir=root / "left",
            log_path=root / "left.log", env={}, max_runtime_seconds=60, grace_seconds=1))
        while len(ended) < 20:
            await asyncio.sleep(0.02)
        sup.detach()
        print(json.dumps({"threads": threads, "during": during, "limit": limit,
                          "hard": hard, "codes": [ended[f"a{n}"] for n in range(20)],
                          "left": survivor.pid}))

    asyncio.run(main())
    gc.collect()
""")


def test_agents_are_waited_for_on_pidfds_and_outlive_the_supervisor(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True,
                         text=True, timeout=60, check=True, cwd=Path(__file__).parents[2])
    seen = json.loads(out.stdout)
    # Twenty agents running at once, and not one thread more for them.
    assert seen["during"] == seen["threads"]
    assert seen["codes"] == list(range(20))
    # One open file per live agent: the soft limit was raised to the hard limit.
    assert seen["limit"] == seen["hard"]
    # The agent still running when the supervisor let go (a spoke's shutdown) lives on
    # after that whole interpreter has ended.
    left = seen["left"]
    try:
        assert Path(f"/proc/{left}/stat").exists()
        assert Path(f"/proc/{left}/stat").read_text().split(") ")[1][0] in "RS"
    finally:
        subprocess.run(["kill", str(left)], check=False)
