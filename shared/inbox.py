"""Receiving signed envelopes from peers: the one path every peer-facing Deliver takes.

Open (verify the exact bytes, then parse; docs/design.md's rules), accept only the bodies
this API takes, run each message once through replay memory, seal the answer, and audit
every refusal. Servicers supply only what to do with an accepted message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import nullcontext

import grpc

from shared.audit import REFUSED, AuditEntry, AuditTrail
from shared.db.direct import Statements
from shared.envelope import Keyring, OpenedEnvelope, open_envelope, seal_envelope
from shared.errors import (
    EnvelopeRejected,
    FleetwireError,
    InvalidArgument,
    Unauthenticated,
    abort,
)
from shared.identity import Identity
from shared.metrics import Metrics
from shared.pb.v1 import wire_pb2
from shared.replay import MessageMemory
from shared.security_view import SecurityView
from shared.tls import fingerprint

log = logging.getLogger(__name__)

# The answer to an accepted message.
Answer = Callable[[OpenedEnvelope], Awaitable[wire_pb2.Response]]
# The answer to a message the servicer applies among the statements of the transaction
# that also records its id and answer (a quick change, such as a status report).
AnswerWithin = Callable[[OpenedEnvelope, Statements], wire_pb2.Response]


def _never(_: wire_pb2.Envelope) -> bool:
    return False


class EnvelopeInbox:
    def __init__(self, identity: Identity, keyring: Keyring, memory: MessageMemory,
                 trail: AuditTrail, metrics: Metrics, skew_ms: int, *,
                 mutual_tls: bool, view: SecurityView | None = None) -> None:
        self._identity = identity
        # What the keyring and the answers look up is checked against this once per
        # message (None: each lookup checks for itself).
        self._view = view
        self._keyring = keyring
        self._memory = memory
        self._trail = trail
        self._metrics = metrics
        self._skew_ms = skew_ms
        # With TLS, the certificate a peer connected with must be the one pinned in the
        # record of the key that signed: one identity, not two that could disagree.
        self._mutual_tls = mutual_tls
        # Messages being handled, kept referenced until they finish.
        self._carrying: set[asyncio.Future[bytes]] = set()

    async def deliver(self, request: wire_pb2.SignedEnvelope,
                      context: grpc.aio.ServicerContext, *, accepts: frozenset[str],
                      refusal: str, answer: Answer,
                      reads_only: Callable[[wire_pb2.Envelope], bool] = _never,
                      in_one_transaction: Callable[[wire_pb2.Envelope], bool] = _never,
                      answer_within: AnswerWithin | None = None,
                      ) -> wire_pb2.SignedEnvelope:
        """The signed answer to one envelope; refusals end the RPC with their status.

        reads_only(envelope): the answer changes nothing, so the message id is recorded
        after it, with it. in_one_transaction(envelope): answer_within gives the answer,
        making its changes in the transaction that records the id and the answer.
        """
        try:
            sealed = await self.sealed_answer(
                request, self.presented(context), accepts=accepts, refusal=refusal,
                answer=answer, reads_only=reads_only, in_one_transaction=in_one_transaction,
                answer_within=answer_within)
        except FleetwireError as err:
            await abort(context, err)
        return wire_pb2.SignedEnvelope.FromString(sealed)

    def presented(self, context: grpc.aio.ServicerContext) -> str | None:
        """The fingerprint of the TLS certificate the caller's connection presented
        (None: none; always None without mutual TLS, where nothing checks it). The same
        for every message on one stream, so a stream's handler asks once."""
        if not self._mutual_tls:
            return None
        certificates = (context.auth_context() or {}).get("x509_pem_cert") or []
        return fingerprint(certificates[0]) if certificates else None

    async def sealed_answer(self, request: wire_pb2.SignedEnvelope,
                            presented: str | None, *, accepts: frozenset[str],
                            refusal: str, answer: Answer,
                            reads_only: Callable[[wire_pb2.Envelope], bool] = _never,
                            in_one_transaction: Callable[[wire_pb2.Envelope], bool] = _never,
                            answer_within: AnswerWithin | None = None,
                            caller_may_leave: bool = True) -> bytes:
        """deliver(), giving the signed answer's bytes and raising a refusal (counted
        and audited) instead of ending the RPC: for one delivery of many on a stream.
        presented: what presented() said of the connection it came on.

        caller_may_leave: the caller can be cancelled before the answer is ready (a
        unary call whose deadline passed), so the work runs in a task of its own that
        goes on to its end. False for a caller that is itself such a task (a delivery
        on a command stream): one task fewer per message.
        """
        async with self._view.checked() if self._view is not None else nullcontext():
            return await self._deliver(request, presented, accepts=accepts, refusal=refusal,
                                       answer=answer, reads_only=reads_only,
                                       in_one_transaction=in_one_transaction,
                                       answer_within=answer_within,
                                       caller_may_leave=caller_may_leave)

    async def _deliver(self, request: wire_pb2.SignedEnvelope,
                       presented: str | None, *, accepts: frozenset[str],
                       refusal: str, answer: Answer,
                       reads_only: Callable[[wire_pb2.Envelope], bool],
                       in_one_transaction: Callable[[wire_pb2.Envelope], bool],
                       answer_within: AnswerWithin | None, caller_may_leave: bool) -> bytes:
        # Which step a refusal came from, for the rejection metric.
        step = "malformed"
        try:
            opened = await open_envelope(request, keyring=self._keyring,
                                         me=self._identity.name, skew_ms=self._skew_ms)
            if self._mutual_tls:
                _check_tls_binding(opened, presented)
            if opened.envelope.WhichOneof("body") not in accepts:
                step = "unexpected_body"
                raise InvalidArgument(refusal)
            step = "replay"
            # A caller that gives up (its deadline passed) must not stop a command half
            # way: a spawn cut off after its record but before its process would be
            # found by the retry and taken as done. The work runs to its end apart from
            # the RPC, and its stored answer is what the retry gets.
            if answer_within is not None and in_one_transaction(opened.envelope):
                within = answer_within
                handling = self._memory.once_within(
                    opened, lambda tx: self._seal(opened, within(opened, tx)),
                    self._trail.apply)
            else:
                handling = self._memory.once(opened, lambda: self._sealed(opened, answer),
                                             reads_only=reads_only(opened.envelope))
            if caller_may_leave:
                work = asyncio.ensure_future(handling)
                self._carrying.add(work)
                work.add_done_callback(_settle)
                work.add_done_callback(self._carrying.discard)
                sealed = await asyncio.shield(work)
            else:
                sealed = await handling
        except FleetwireError as err:
            self._metrics.envelope_rejected(_rejection(err, step))
            # Only the outer key_id is named: unverified bytes are never parsed.
            await self._trail.record(AuditEntry(
                action="envelope", outcome=REFUSED, target=f"key_id {request.key_id[:32]}",
                reason=err.message))
            raise
        return sealed

    async def _sealed(self, opened: OpenedEnvelope, answer: Answer) -> bytes:
        return self._seal(opened, await answer(opened))

    def _seal(self, opened: OpenedEnvelope, response: wire_pb2.Response) -> bytes:
        env = opened.envelope
        return seal_envelope(self._identity, recipient=env.sender, response=response,
                             in_reply_to=env.message_id).SerializeToString()


def _rejection(err: FleetwireError, step: str) -> str:
    """The rejection metric's reason for a refusal at `step`."""
    if isinstance(err, EnvelopeRejected):
        return err.rule
    if step == "replay" and not isinstance(err, Unauthenticated):
        # Past the checks only replay memory refuses as UNAUTHENTICATED; anything else
        # failing there is the answer's own failure.
        return "other"
    return step


def _settle(work: asyncio.Future[bytes]) -> None:
    """Collect the outcome of work whose caller may have left (no 'never retrieved')."""
    if not work.cancelled() and work.exception() is not None:
        log.debug("a message finished with %r after its caller left", work.exception())


def _check_tls_binding(opened: OpenedEnvelope, presented: str | None) -> None:
    if presented is None:
        raise EnvelopeRejected(
            "tls_mismatch",
            "envelope rejected: no TLS client certificate; peers connect to this port with "
            "mutual TLS (the operator API is elsewhere)")
    sender = opened.envelope.sender
    if not opened.sender_tls_fingerprint:
        raise EnvelopeRejected(
            "tls_mismatch",
            f"envelope rejected: no TLS certificate is pinned for '{sender}'; add it with "
            "`fleetwire peer add --tls-cert` or join again")
    if presented != opened.sender_tls_fingerprint:
        raise EnvelopeRejected(
            "tls_mismatch",
            f"envelope rejected: the TLS certificate of this connection is not the one "
            f"pinned for '{sender}'")
