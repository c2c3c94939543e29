"""The operator's client of the hub API, used by `fleetwire agent ...` and the demo."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import grpc

from shared.config import KeepAliveConfig
from shared.errors import IDEMPOTENCY_KEY, FleetwireError, InvalidArgument, from_rpc_error
from shared.pb.v1 import operator_pb2, operator_pb2_grpc, wire_pb2
from shared.peers import check_address
from shared.rpc import open_channel
from shared.scope import Role
from shared.tls import (
    FINGERPRINT_PREFIX,
    certificate_name,
    check_certificate,
    fetch_certificate,
    is_loopback,
    pinned_certificate,
    self_signed,
)

CALL_TIMEOUT_SECONDS = 60.0


def _trust(address: str, ca: str) -> tuple[grpc.ChannelCredentials | None, str]:
    """Channel credentials for --hub-ca (None: plaintext) and the TLS name to check."""
    if not ca:
        return None, ""
    if ca.startswith(FINGERPRINT_PREFIX):
        cert = pinned_certificate(address, ca, "the hub")
        if cert is None:
            raise InvalidArgument(f"the hub at {address} does not speak TLS, but --hub-ca "
                                  "asks for it; check the address")
        return grpc.ssl_channel_credentials(root_certificates=cert), certificate_name(cert)
    try:
        pem = Path(ca).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"--hub-ca {ca}: {exc.strerror}; give the hub's tls.crt or "
                              "sha256:FINGERPRINT") from None
    check_certificate(pem, f"--hub-ca {ca}")
    # A Fleetwire certificate names the hub, not the host: check that name. A CA's
    # certificate is checked against the address as usual.
    name = certificate_name(pem) if self_signed(pem) else ""
    return grpc.ssl_channel_credentials(root_certificates=pem), name


class HubClient:
    """The operator API over one channel. `ca` is how the hub's TLS certificate is
    trusted: a PEM file (the hub's tls.crt, or a CA's), or `sha256:HEX` to pin the
    certificate itself; without one, only a loopback hub is reached, in plaintext: a
    bearer token never crosses a network unencrypted. `idempotency_key`: the key of the
    calls that create or change something (default: a new one for each call); the same
    call again with the same key gets the first call's answer."""

    def __init__(self, address: str, token: str, ca: str = "",
                 idempotency_key: str = "") -> None:
        if not address:
            raise InvalidArgument("no hub address; pass --hub HOST:PORT or set FLEETWIRE_HUB")
        if not token:
            raise InvalidArgument("no operator token; pass --token or set FLEETWIRE_TOKEN")
        self._address = check_address(address)
        if not ca and not is_loopback(address):
            raise InvalidArgument(
                f"refusing to send an operator token in plaintext to {address} (not a "
                "loopback address): pass --hub-ca with the hub's tls.crt or its sha256: "
                "fingerprint (or set FLEETWIRE_HUB_CA)")
        self._ca = ca
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._idempotency_key = idempotency_key

    async def __aenter__(self) -> HubClient:
        creds, name = await asyncio.to_thread(_trust, self._address, self._ca)
        self._channel = open_channel(self._address, KeepAliveConfig(), creds, name)
        self._stub = operator_pb2_grpc.OperatorServiceStub(self._channel)
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None
                        ) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: object, timeout: float, *,
                    changes: bool = False) -> object:
        """Call method; one that creates or changes something carries an idempotency key
        (this client's, or a new one per call), so the same call again gets the first
        answer (hub/idempotency.py)."""
        metadata: tuple[tuple[str, str], ...] = self._metadata
        if changes:
            metadata += ((IDEMPOTENCY_KEY, self._idempotency_key or uuid.uuid4().hex),)
        try:
            return await getattr(self._stub, method)(
                request, metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if (exc.code() == grpc.StatusCode.UNAVAILABLE and not self._ca
                    and await asyncio.to_thread(fetch_certificate, self._address)):
                raise InvalidArgument(
                    f"{self._address} speaks TLS: pass --hub-ca with the hub's tls.crt or its "
                    "sha256: fingerprint (see `fleetwire identity show` on the hub)") from None
            err: FleetwireError = from_rpc_error(exc, target=f"the hub at {self._address}")
            raise err from None

    async def spawn(self, *, spoke: str, workspace: str, template: str, task: str,
                    params: dict[str, str]) -> wire_pb2.Agent:
        req = operator_pb2.SpawnAgentRequest(spoke=spoke, workspace=workspace,
                                             template=template, task=task, params=params)
        return await self._call("SpawnAgent", req, CALL_TIMEOUT_SECONDS, changes=True)  # type: ignore[return-value]

    async def status(self, agent_id: str, *, live: bool = False) -> wire_pb2.Agent:
        req = operator_pb2.GetAgentRequest(agent_id=agent_id, live=live)
        return await self._call("GetAgent", req, CALL_TIMEOUT_SECONDS)  # type: ignore[return-value]

    async def list(self, *, spoke: str = "", workspace: str = "", live: bool = False
                   ) -> operator_pb2.ListAgentsResponse:
        req = operator_pb2.ListAgentsRequest(spoke=spoke, workspace=workspace, live=live)
        return await self._call("ListAgents", req, CALL_TIMEOUT_SECONDS)  # type: ignore[return-value]

    async def kill(self, agent_id: str, grace_ms: int | None = None,
                   reason: str = "") -> wire_pb2.Agent:
        req = operator_pb2.KillAgentRequest(agent_id=agent_id, reason=reason)
        if grace_ms is not None:
            req.grace_ms = grace_ms
        timeout = CALL_TIMEOUT_SECONDS + (grace_ms or 0) / 1000
        return await self._call("KillAgent", req, timeout, changes=True)  # type: ignore[return-value]

    async def kill_many(self, req: operator_pb2.KillAgentsRequest
                        ) -> operator_pb2.KillAgentsResponse:
        timeout = CALL_TIMEOUT_SECONDS + (req.grace_ms if req.HasField("grace_ms") else 0) / 1000
        return await self._call("KillAgents", req, timeout, changes=True)  # type: ignore[return-value]

    async def create_token(self, principal: str, role: Role) -> operator_pb2.IssuedToken:
        req = operator_pb2.CreateTokenRequest(principal=principal, role=f"ROLE_{role.name}")
        return await self._call("CreateToken", req, CALL_TIMEOUT_SECONDS, changes=True)  # type: ignore[return-value]

    async def list_tokens(self) -> operator_pb2.ListTokensResponse:
        req = operator_pb2.ListTokensRequest()
        return await self._call("ListTokens", req, CALL_TIMEOUT_SECONDS)  # type: ignore[return-value]

    async def rotate_token(self, token_id: int, grace_hours: int) -> operator_pb2.IssuedToken:
        req = operator_pb2.RotateTokenRequest(id=token_id, grace_hours=grace_hours)
        return await self._call("RotateToken", req, CALL_TIMEOUT_SECONDS, changes=True)  # type: ignore[return-value]

    async def revoke_token(self, token_id: int) -> None:
        req = operator_pb2.RevokeTokenRequest(id=token_id)
        await self._call("RevokeToken", req, CALL_TIMEOUT_SECONDS, changes=True)

    async def create_workspace(self, *, spoke: str, workspace: str,
                               max_agents: int) -> wire_pb2.Workspace:
        req = operator_pb2.CreateWorkspaceRequest(spoke=spoke, workspace=workspace,
                                                  max_agents=max_agents)
        return await self._call("CreateWorkspace", req, CALL_TIMEOUT_SECONDS, changes=True)  # type: ignore[return-value]

    async def logs(self, agent_id: str, tail_lines: int = 0) -> wire_pb2.AgentLogs:
        req = operator_pb2.GetLogsRequest(agent_id=agent_id, tail_lines=tail_lines)
        return await self._call("GetLogs", req, CALL_TIMEOUT_SECONDS)  # type: ignore[return-value]

    async def spokes(self) -> operator_pb2.ListSpokesResponse:
        req = operator_pb2.ListSpokesRequest()
        return await self._call("ListSpokes", req, CALL_TIMEOUT_SECONDS)  # type: ignore[return-value]

    async def watch(self, workspace: str = "") -> AsyncIterator[wire_pb2.Agent]:
        """Agent changes of the token's tenant as the hub learns them."""
        call = self._stub.WatchAgents(operator_pb2.WatchAgentsRequest(workspace=workspace),
                                      metadata=self._metadata)
        try:
            async for agent in call:
                yield agent
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, target=f"the hub at {self._address}") from None
        finally:
            call.cancel()
