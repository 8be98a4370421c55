"""Secure aggregation's stages inside a round, whatever the transport (`fleet.secagg`).

The server side of `secagg.protocol` with the round's clock: a stage ends when every
device expected has answered, or at its deadline with those that did.

    advertise  until all selected devices sent keys, or a quarter of the round
    share      until all that advertised sent sealed shares, or the round's deadline
    masked     until all that shared sent their masked vector, or deadline + grace
    unmask     until all survivors sent their shares, or deadline + 2 grace

grace is a quarter of the round's timeout. What the stages send back are `Outbound`
messages (a device's roster or inbox, or the unmask request to all) for the transport
to deliver. The session is not persisted: an aggregator restarted mid-round cannot
finish that round's SecAgg, which then closes with its devices as stragglers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.fl.types import PartialSum
from edge_runtime.secagg.layout import Layout
from edge_runtime.secagg.protocol import SecAggError, SecAggParams, ServerSession

__all__ = ["Outbound", "SecureRound"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outbound:
    """A message for one device (`device`) or all of them (None)."""

    device: str | None
    stage: str
    payload: bytes


@dataclass
class SecureRound:
    params: SecAggParams
    layout: Layout
    opened: float
    deadline: float
    grace: float
    server: ServerSession = field(init=False)
    stage: str = "advertise"
    result: tuple[PartialSum, list[str]] | None = None
    failed: str = ""

    def __post_init__(self) -> None:
        self.server = ServerSession(self.params)

    @property
    def done(self) -> bool:
        return self.stage == "done"

    def _deadline(self) -> float:
        return {"advertise": self.opened + 0.25 * (self.deadline - self.opened),
                "share": self.deadline, "masked": self.deadline + self.grace,
                "unmask": self.deadline + 2 * self.grace}.get(self.stage, self.deadline)

    def on_message(self, dev: str, stage: str, payload: bytes, now: float) -> list[Outbound]:
        """A device's stage message. Raises SecAggError (malformed or out of turn)."""
        s = self.server
        if stage == "advertise" and self.stage == "advertise":
            s.on_advertise(dev, payload)
        elif stage == "share" and self.stage == "share":
            s.on_share(dev, payload)
        elif stage == "masked" and self.stage in ("share", "masked"):
            if self.stage == "share":
                raise SecAggError(f"{dev} sent a masked vector before the shares were routed")
            s.on_masked(dev, payload)
        elif stage == "unmask" and self.stage == "unmask":
            s.on_unmask(dev, payload)
        else:
            raise SecAggError(f"{dev}: a {stage} message in the {self.stage} stage")
        return self.tick(now)

    def _complete(self) -> bool:
        s, p = self.server, self.params
        return {"advertise": set(s.keys) >= set(p.devices),
                "share": set(s.sealed) >= set(s.keys),
                "masked": set(s.masked) >= set(s.sealed),
                "unmask": s.unmaskers >= set(s.masked)}.get(self.stage, False)

    def tick(self, now: float) -> list[Outbound]:
        """Advance every stage that is complete or past its deadline."""
        out: list[Outbound] = []
        while not self.done and (self._complete() or now >= self._deadline()):
            out += self._advance()
        return out

    def _advance(self) -> list[Outbound]:
        s = self.server
        if self.stage == "advertise":
            self.stage = "share"
            if len(s.keys) < 2:
                return self._fail(f"{len(s.keys)} devices advertised keys")
            return [Outbound(d, "roster", s.roster_for(d)) for d in sorted(s.keys)]
        if self.stage == "share":
            self.stage = "masked"
            if len(s.sealed) < 2:
                return self._fail(f"{len(s.sealed)} devices shared keys")
            return [Outbound(d, "inbox", s.inbox_for(d)) for d in sorted(s.sealed)]
        if self.stage == "masked":
            self.stage = "unmask"
            if len(s.masked) < self.params.threshold:
                return self._fail(f"{len(s.masked)} masked vectors, below the threshold")
            return [Outbound(None, "unmask", s.unmask_request())]
        try:
            total, survivors = s.result()
        except SecAggError as e:
            return self._fail(str(e))
        self.result = (self.layout.from_vector(np.asarray(total), len(survivors)), survivors)
        self.stage = "done"
        return []

    def _fail(self, why: str) -> list[Outbound]:
        self.failed = why
        self.stage = "done"
        log.warning("secure aggregation failed this round: %s", why)
        return []
