"""The agent launcher (a shell script): rlimits and cgroups before exec, refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

from spoke.launch import launcher_argv


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_sets_rlimits_then_execs_the_program() -> None:
    out = _run(launcher_argv(cgroups=[], open_files=64, cpu_seconds=7,
                             argv=["/bin/sh", "-c", "ulimit -n; ulimit -St; ulimit -Ht; echo $$"]))
    assert out.returncode == 0, out.stderr
    nofile, soft_cpu, hard_cpu, _pid = out.stdout.split()
    assert (nofile, soft_cpu, hard_cpu) == ("64", "7", "8")


def test_joins_the_cgroup_with_the_agents_own_pid(tmp_path: Path) -> None:
    # A plain folder stands in for a cgroup: the launcher writes its pid, which the
    # exec keeps, into cgroup.procs.
    out = _run(launcher_argv(cgroups=[str(tmp_path)], open_files=0, cpu_seconds=0,
                             argv=["/bin/sh", "-c", "echo $$"]))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cgroup.procs").read_text().strip() == out.stdout.strip()


def test_a_missing_program_is_refused_with_its_name() -> None:
    out = _run(launcher_argv(cgroups=[], open_files=0, cpu_seconds=0,
                             argv=["/no/such/program", "x"]))
    assert out.returncode == 127
    assert "cannot start '/no/such/program'" in out.stderr


def test_a_cgroup_that_refuses_stops_the_launch(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    out = _run(launcher_argv(cgroups=[str(tmp_path / "missing")], open_files=0,
                             cpu_seconds=0, argv=["/bin/touch", str(marker)]))
    assert out.returncode != 0
    assert "cgroup.procs" in out.stderr
    assert not marker.exists()
