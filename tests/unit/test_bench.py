"""The benchmark's arithmetic: percentiles and how ratios are held to their targets."""

from __future__ import annotations

from hub.bench import _ms, _ratios, bare_isolated_argv


def test_percentiles_in_milliseconds() -> None:
    samples = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    out = _ms(samples)
    assert out["n"] == 100 and out["p50_ms"] == 50.5 and out["p99_ms"] == 100.0


def test_ratios_are_checked_against_their_targets() -> None:
    figures = {
        "echo_two_hops": {"p50_ms": 2.0, "p99_ms": 3.0, "n": 1},
        "status_live": {"p50_ms": 2.5, "p99_ms": 4.0, "n": 1},
        "status_live_throughput_32": 600.0, "echo_two_hops_throughput_32": 1000.0,
        "spawn": {"p50_ms": 10.0, "p99_ms": 12.0, "n": 1},
        "bare_isolated_launch": {"p50_ms": 6.0, "p99_ms": 7.0, "n": 1},
        "kill": {"p50_ms": 40.0, "p99_ms": 50.0, "n": 1},
        "status_live_with_5_agents": {"p50_ms": 3.0, "p99_ms": 9.0, "n": 1},
        "spoke_rss_with_5_agents_mb": 150.0,
    }
    rows = {name: (value, met) for name, value, _, met in _ratios(figures, 5)}
    assert rows["status (live) p50 / two-hop echo p50"] == (1.25, True)
    assert rows["status throughput@32 / two-hop echo throughput@32"] == (0.6, True)
    assert rows["spawn p50 - (bare isolated launch p50 + two-hop echo p50), ms"] == (2.0, True)
    assert rows["kill p50 - two-hop echo p50, ms"] == (38.0, False)
    assert rows["status p99 with 5 agents / idle"] == (2.25, False)
    assert rows["spoke RSS with 5 agents, MB"] == (150.0, True)


def test_the_bare_launch_has_the_isolation_agents_get() -> None:
    """The baseline runs with each level's namespaces and identity, as agents would."""
    full = bare_isolated_argv("full")
    assert full[:1] == ["unshare"] and {"--pid", "--mount", "--ipc"} <= set(full)
    assert "--clear-groups" in full and "--no-new-privs" in full
    assert "--user" in bare_isolated_argv("namespaces")
    assert bare_isolated_argv("none") == ["/bin/true"]
