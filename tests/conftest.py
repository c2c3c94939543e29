"""Fixtures that build real federations: daemons are real processes on loopback port 0."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from hub.demo import Daemon, LocalFederation
from shared.cli import build_cli

AGENTS = Path(__file__).parent / "agents"
# Faster liveness than the defaults, so OFFLINE/ONLINE changes happen within a test.
TEST_HEARTBEAT_SECONDS = 0.3
TEST_OFFLINE_AFTER = 2.0

TEST_TEMPLATES = f'''
[templates.sleeper]
description = "Sleeps until killed; exits 0 on SIGTERM"
argv = ["{{python}}", "-m", "spoke.demo_agent", "--task", "{{task}}",
        "--steps", "100000", "--interval", "0.2"]
grace_seconds = 2

[templates.stubborn]
argv = ["{{python}}", "{AGENTS / 'stubborn.py'}"]
grace_seconds = 1

[templates.exit-with]
argv = ["{{python}}", "{AGENTS / 'exit_with.py'}", "{{code}}", "{{task}}"]
params = {{ code = "0" }}

[templates.until-told]
argv = ["{{python}}", "{AGENTS / 'until_told.py'}"]
grace_seconds = 1

[templates.short-lived]
argv = ["{{python}}", "-c", "import time; time.sleep(60)"]
max_runtime_seconds = 1
grace_seconds = 1

[templates.missing-binary]
argv = ["/nonexistent/fleetwire-test-binary"]
'''


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration starts real daemons: the slow tier."""
    integration = Path(__file__).parent / "integration"
    for item in items:
        if item.path.is_relative_to(integration):
            item.add_marker(pytest.mark.slow)


class InProcessFederation(LocalFederation):
    """Runs set-up commands in this process (fast); daemons are still real processes."""

    def run_cli(self, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        result = CliRunner().invoke(build_cli(), args, env=env, catch_exceptions=False)
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout,
                                           result.stderr)


@dataclass
class Federation:
    """A running hub with spokes, tenants acme (research, lab) and globex (ops)."""

    fed: LocalFederation
    hub: Daemon
    spokes: dict[str, Daemon]
    tokens: dict[str, str]

    @property
    def root(self) -> Path:
        return self.fed.root

    def home(self, name: str) -> Path:
        return self.fed.homes[name]

    def agent_workdir(self, spoke: str, tenant: str, workspace: str, agent_id: str) -> Path:
        return self.home(spoke) / "workspaces" / tenant / workspace / "agents" / agent_id

    def peer_channel(self, sender: str, target: str, address: str = "") -> grpc.aio.Channel:
        """A channel to instance `target` that presents `sender`'s TLS client certificate
        and pins `target`'s: what `sender` itself would open."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=(self.home(target) / "tls.crt").read_bytes(),
            private_key=(self.home(sender) / "tls.key").read_bytes(),
            certificate_chain=(self.home(sender) / "tls.crt").read_bytes())
        if not address:
            address = (self.hub.peer_address if target == self.hub.name
                       else self.spokes[target].address)
        return grpc.aio.secure_channel(address, creds,
                                       options=[("grpc.ssl_target_name_override", target)])

    def agent_env(self, token_name: str) -> dict[str, str]:
        return {"FLEETWIRE_HUB": self.hub.address, "FLEETWIRE_TOKEN": self.tokens[token_name]}

    def token(self, tenant: str, *, principal: str, role: str) -> str:
        out = self.fed.cli("token", "create", "--home", str(self.home(self.hub.name)),
                           "--tenant", tenant, "--principal", principal, "--role", role,
                           "--json").stdout
        return str(json.loads(out)["token"])

    def add_spoke(self, name: str, *, tenants: dict[str, list[str]],
                  hub_address: str | None = None, start: bool = True,
                  grants: list[tuple[str, str | None, str]] | None = None,
                  database_url: str = "") -> Daemon | None:
        """Create, configure and (optionally) start one more spoke known to the hub.
        grants: (tenant, workspace or None, max role); default: every tenant, operator.
        database_url: the spoke's database (default: SQLite in its home)."""
        fed = self.fed
        home = fed.init(name)
        config = home / "config.toml"
        config.write_text(config.read_text().replace(
            "heartbeat_seconds = 5", f"heartbeat_seconds = {TEST_HEARTBEAT_SECONDS}"))
        with open(config, "a") as f:
            f.write(TEST_TEMPLATES)
            if database_url:
                f.write(f'\n[database]\nurl = "{database_url}"\n')
        if database_url:
            fed.cli("migrate", "--home", str(home))
        for tenant, workspaces in tenants.items():
            fed.cli("tenant", "create", "--home", str(home), tenant)
            for ws in workspaces:
                fed.cli("workspace", "create", "--home", str(home), "--tenant", tenant, ws)
        fed.trust(name, self.hub.name, address=self.hub.peer_address)
        for tenant, workspace, role in grants or [(t, None, "operator") for t in tenants]:
            fed.cli("grant", "add", "--home", str(home), "--peer", self.hub.name,
                    "--tenant", tenant, "--max-role", role,
                    *(["--workspace", workspace] if workspace else []))
        if not start:
            return None
        daemon = fed.start("spoke", name)
        fed.trust(self.hub.name, name, address=hub_address or daemon.address)
        self.spokes[name] = daemon
        return daemon


def build_federation(root: Path, database_url: str = "") -> Iterator[Federation]:
    """database_url: the hub's database (default: SQLite in its home)."""
    suffix = secrets.token_hex(2)
    fed = InProcessFederation(root=root)
    try:
        hub_name = f"hub-{suffix}"
        hub_home = fed.init(hub_name)
        config = hub_home / "config.toml"
        config.write_text(config.read_text().replace(
            "offline_after_seconds = 15", f"offline_after_seconds = {TEST_OFFLINE_AFTER}")
            + (f'\n[database]\nurl = "{database_url}"\n' if database_url else ""))
        if database_url:
            fed.cli("migrate", "--home", str(hub_home))
        for tenant in ("acme", "globex"):
            fed.cli("tenant", "create", "--home", str(fed.homes[hub_name]), tenant)
        hub = fed.start("hub", hub_name)
        federation = Federation(fed=fed, hub=hub, spokes={}, tokens={})
        for spoke in ("spoke-a", "spoke-b"):
            federation.add_spoke(spoke, tenants={"acme": ["research", "lab"],
                                                 "globex": ["ops"]})
        federation.tokens = {
            "acme": federation.token("acme", principal="alice", role="operator"),
            "acme-bob": federation.token("acme", principal="bob", role="operator"),
            "acme-viewer": federation.token("acme", principal="vera", role="viewer"),
            "acme-admin": federation.token("acme", principal="ada", role="admin"),
            "globex": federation.token("globex", principal="gina", role="admin"),
        }
        yield federation
    finally:
        fed.close()


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """One federation for the whole session: hub, spoke-a, spoke-b, five tokens."""
    yield from build_federation(tmp_path_factory.mktemp("federation"))
