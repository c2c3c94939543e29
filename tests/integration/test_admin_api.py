"""A tenant's admins manage its tokens and workspaces through the hub, and only theirs."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from hub.client import HubClient
from shared.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from shared.scope import Role
from tests.conftest import Federation, build_federation
from tests.integration.helpers import state


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    for f in build_federation(tmp_path_factory.mktemp("admin")):
        f.add_spoke("spoke-adm", tenants={"acme": ["research"], "globex": ["ops"]},
                    grants=[("acme", None, "admin"), ("globex", "ops", "admin")])
        f.add_spoke("spoke-narrow", tenants={"acme": ["research"]},
                    grants=[("acme", "research", "admin")])
        yield f


def as_(fed: Federation, who: str) -> HubClient:
    return HubClient(fed.hub.address, fed.tokens[who])


async def test_admin_manages_tokens_of_its_own_tenant_only(fed: Federation) -> None:
    async with as_(fed, "acme-admin") as ada, as_(fed, "globex") as gina, \
            as_(fed, "acme") as alice:
        issued = await ada.create_token("carl", Role.VIEWER)
        assert issued.tenant == "acme" and issued.token.startswith("fwt_")
        async with HubClient(fed.hub.address, issued.token) as carl:
            await carl.list(spoke="spoke-a")
            with pytest.raises(PermissionDenied):
                await carl.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                                 task="", params={})
        listed = await ada.list_tokens()
        assert {t.tenant for t in listed.tokens} == {"acme"}
        assert issued.id in {t.id for t in listed.tokens}
        # globex's admin cannot see or touch acme's tokens: like tokens that do not exist.
        assert issued.id not in {t.id for t in (await gina.list_tokens()).tokens}
        with pytest.raises(NotFound):
            await gina.revoke_token(issued.id)
        with pytest.raises(NotFound):
            await gina.rotate_token(issued.id, 1)
        # An operator may not manage tokens.
        with pytest.raises(PermissionDenied):
            await alice.create_token("mallory", Role.ADMIN)
        with pytest.raises(PermissionDenied):
            await alice.list_tokens()

        rotated = await ada.rotate_token(issued.id, 2)
        assert rotated.replaces == issued.id and rotated.principal == "carl"
        await ada.revoke_token(issued.id)
        async with HubClient(fed.hub.address, issued.token) as carl:
            with pytest.raises(Unauthenticated):
                await carl.list(spoke="spoke-a")
        async with HubClient(fed.hub.address, rotated.token) as carl:
            await carl.list(spoke="spoke-a")
        with pytest.raises(InvalidArgument):
            await ada.create_token("bad name!", Role.VIEWER)


async def test_admin_creates_workspaces_where_its_grant_covers_the_tenant(
        fed: Federation) -> None:
    async with as_(fed, "acme-admin") as ada, as_(fed, "acme") as alice, \
            as_(fed, "globex") as gina:
        made = await ada.create_workspace(spoke="spoke-adm", workspace="pilot", max_agents=1)
        assert (made.spoke, made.tenant, made.workspace, made.max_agents) == (
            "spoke-adm", "acme", "pilot", 1)
        agent = await alice.spawn(spoke="spoke-adm", workspace="pilot", template="sleeper",
                                  task="", params={})
        assert state(agent) == "RUNNING"
        with pytest.raises(ResourceExhausted):
            await alice.spawn(spoke="spoke-adm", workspace="pilot", template="sleeper",
                              task="", params={})
        with pytest.raises(InvalidArgument) as err:
            await ada.create_workspace(spoke="spoke-adm", workspace="pilot", max_agents=0)
        assert "already exists" in err.value.message
        # A grant for single workspaces, or one below admin, does not let the hub make any.
        with pytest.raises(PermissionDenied) as err:
            await ada.create_workspace(spoke="spoke-narrow", workspace="x", max_agents=0)
        assert "whole-tenant admin grant" in err.value.message
        with pytest.raises(PermissionDenied):
            await ada.create_workspace(spoke="spoke-a", workspace="x", max_agents=0)
        with pytest.raises(PermissionDenied):
            await alice.create_workspace(spoke="spoke-adm", workspace="x", max_agents=0)
        # globex's hub grant there names one workspace only; on spoke-narrow it has none.
        with pytest.raises(PermissionDenied):
            await gina.create_workspace(spoke="spoke-adm", workspace="x", max_agents=0)
        with pytest.raises(NotFound) as err:
            await gina.create_workspace(spoke="spoke-narrow", workspace="x", max_agents=0)
        assert "tenant 'globex' not found" in err.value.message
        await alice.kill(agent.agent_id, grace_ms=2000)


def test_admin_commands_through_the_cli(fed: Federation) -> None:
    env = fed.agent_env("acme-admin")
    made = json.loads(fed.fed.cli("token", "create", "--principal", "dora", "--role",
                                  "viewer", "--json", env=env, show=False).stdout)
    assert made["tenant"] == "acme" and made["role"] == "viewer"
    listed = json.loads(fed.fed.cli("token", "list", "--json", env=env, show=False).stdout)
    assert made["id"] in {t["id"] for t in listed}
    out = fed.fed.cli("workspace", "create", "--spoke", "spoke-adm", "cli-made", env=env,
                      show=False).stdout
    assert "created workspace 'cli-made' in tenant 'acme' on spoke 'spoke-adm'" in out
    wrong = fed.fed.cli("token", "create", "--tenant", "globex", env=env, check=False,
                        show=False)
    assert wrong.returncode == 2 and "drop --tenant" in wrong.stderr
