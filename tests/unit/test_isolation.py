"""Choosing the isolation level, refusing what the machine cannot give, uid claims, and
the isolation settings of config.toml."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from shared.config import load_config
from shared.errors import InvalidArgument, ResourceExhausted
from spoke.isolation import Isolation, UidPool, check_uid_range, choose
from spoke.sandbox import FULL, NAMESPACES, NONE
from spoke.shim import release_claim

OK = ""


def config(tmp_path: Path, spoke: str = "", templates: str = ""):
    (tmp_path / "config.toml").write_text(
        f'[instance]\nname = "s"\n[spoke]\n{spoke}\n{templates}')
    return load_config(tmp_path, environ={})


@pytest.mark.parametrize(("asked", "probed", "level", "refused"), [
    ("auto", {FULL: OK, NAMESPACES: "root"}, FULL, False),
    ("auto", {FULL: "not root", NAMESPACES: OK}, NAMESPACES, False),
    ("auto", {FULL: "not root", NAMESPACES: "EPERM"}, NONE, True),
    ("none", {FULL: OK, NAMESPACES: "root"}, NONE, False),
    ("namespaces", {FULL: OK, NAMESPACES: "root"}, FULL, False),
])
def test_the_level_is_the_most_the_machine_allows(tmp_path: Path, asked: str,
                                                   probed: dict[str, str], level: str,
                                                   refused: bool) -> None:
    chosen = choose(config(tmp_path, f'isolation = "{asked}"'), probed)
    assert chosen.level == level and bool(chosen.refusal) == refused


@pytest.mark.parametrize(("asked", "probed", "says"), [
    ("full", {FULL: "not root", NAMESPACES: OK}, 'isolation = "full", but not root'),
    ("namespaces", {FULL: "not root", NAMESPACES: "EPERM"}, "refuses user namespaces"),
])
def test_a_level_the_machine_cannot_give_refuses_the_start(
        tmp_path: Path, asked: str, probed: dict[str, str], says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        choose(config(tmp_path, f'isolation = "{asked}"'), probed)


def test_spawns_are_refused_below_what_a_template_asks_and_when_nothing_isolates() -> None:
    Isolation(FULL).check("t", FULL, "s")
    Isolation(NAMESPACES).check("t", "", "s")
    with pytest.raises(InvalidArgument, match="template 't' requires isolation 'full' and "
                                              "spoke 's' provides 'namespaces'"):
        Isolation(NAMESPACES, limited_by="not root").check("t", FULL, "s")
    with pytest.raises(InvalidArgument, match="spoke 's' cannot isolate agents: no"):
        Isolation(NONE, refusal="no").check("t", "", "s")
    Isolation(NONE).check("t", NONE, "s")


def test_isolation_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"spoke.isolation: 'half' is not one of"):
        config(tmp_path, 'isolation = "half"')
    with pytest.raises(InvalidArgument, match=r"templates.t.network: 'lan' is not one of"):
        config(tmp_path, templates='[templates.t]\nargv = ["x"]\nnetwork = "lan"')
    with pytest.raises(InvalidArgument, match=r"templates.t.isolation: 'max' is not"):
        config(tmp_path, templates='[templates.t]\nargv = ["x"]\nisolation = "max"')
    with pytest.raises(InvalidArgument, match="'opt/tools' is not an absolute path"):
        config(tmp_path, 'agent_paths = ["opt/tools"]')
    cfg = config(tmp_path)
    assert (cfg.spoke.isolation, cfg.spoke.cap_log_mb) == ("auto", 100)


def test_a_uid_range_holding_a_user_or_root_is_refused(tmp_path: Path) -> None:
    check_uid_range(config(tmp_path))
    with pytest.raises(InvalidArgument, match="include uid 65534 of user"):
        check_uid_range(config(tmp_path, "agent_uid_base = 65000\nagent_uid_count = 1000"))
    with pytest.raises(InvalidArgument, match="an invalid uid"):
        check_uid_range(config(tmp_path, "agent_uid_base = 4294967290\nagent_uid_count = 10"))


def test_uids_are_claimed_once_and_given_back(tmp_path: Path) -> None:
    pool = UidPool(5000, 3, tmp_path)
    claims = [pool.claim() for _ in range(3)]
    assert sorted(uid for uid, _ in claims) == [5000, 5001, 5002]
    with pytest.raises(ResourceExhausted, match="every agent uid of this spoke is in use"):
        pool.claim()
    # Another spoke on the machine sees them taken too.
    with pytest.raises(ResourceExhausted):
        UidPool(5000, 3, tmp_path).claim()
    uid, fd = claims[1]
    release_claim(fd)
    assert not (tmp_path / str(uid)).exists()
    again, fd = pool.claim()
    assert again == uid
    for _, held in [c for c in claims if c[0] != uid] + [(again, fd)]:
        release_claim(held)
    assert os.listdir(tmp_path) == []


def test_a_claim_on_a_file_being_given_back_claims_nothing(tmp_path: Path) -> None:
    """A claimer that opened the lock file just before its holder unlinked it gets the
    lock on a file no longer there, and must look again (the holder may be gone)."""
    path = tmp_path / "5000"
    stale = os.open(path, os.O_RDWR | os.O_CREAT)
    os.unlink(path)
    fcntl.flock(stale, fcntl.LOCK_EX)  # a lock on the old, unlinked file
    uid, fd = UidPool(5000, 1, tmp_path).claim()
    assert uid == 5000 and path.exists()
    release_claim(fd)
    os.close(stale)
