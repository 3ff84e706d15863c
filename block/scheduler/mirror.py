"""A scheduler's mirror of one side-car: the instance state the side-car streams, and its predictor.

Asking every side-car ``/predict`` over HTTP for every request made the decision cost a fan-out of round
trips on a busy box (34 ms average at 150 req/s, over the budget, half the decisions falling back). The
side-car streams its state instead (``GET /state/stream``: its model once and after every refit, its state
after every change), and the scheduler predicts in-process with the very Predictor the side-car would use,
rebuilt from that model, plus the requests it dispatched since (``block.routing.StateView``, the same view
the offline router predicts from). The side-car stays the source of truth and the scheduler stays
stateless: a restarted scheduler reconnects and has the same mirrors as its replicas.

The instance's prefix cache comes as changes of its cached block set (``cache``: blocks added and removed
since the previous message, the first message of a connection resetting it), so a candidate's hit is known
without sending the cache every time; ``StateView.predict`` gives the fork the candidate's hit as a cached run.

Messages are parsed as they arrive (cheap) but turned into an InstanceState only when a decision needs the
newest one, so a burst of state changes costs nothing between decisions. A mirror that has not heard from
its side-car within the bound is not used: the caller asks that side-car directly and counts it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import replace

import aiohttp
import orjson

from block.predictor.core import Prediction
from block.prefix_index import BlockSet
from block.protocol import MirroredModel, MirroredState, ProtocolError
from block.routing import StateView
from simulator.engine import EngineConfig
from simulator.fleet import peak_token_throughput
from simulator.workload import Request

log = logging.getLogger(__name__)

# A fork holds the side-car's requests (ids from 0), the request being placed (CANDIDATE_ID) and this
# scheduler's unseen dispatches: each dispatch takes its own id below -1 once, when it is sent
# (``Registry.dispatched``), not again at every decision that sees it.
CANDIDATE_ID = -1
DISPATCH_IDS = itertools.count(-2, -1)
MAX_LINE_BYTES = 16 << 20  # a state message larger than this is refused (about 100k tracked requests)


class Mirror:
    def __init__(self, name: str):
        self.name = name
        self.model: MirroredModel | None = None
        self._raw: dict | None = None  # the newest state message, parsed as JSON only
        self._state: MirroredState | None = None
        self._view: StateView | None = None
        self.received_at = -math.inf  # time.monotonic() of the newest state message
        self.cache = BlockSet()
        self.cache_source = ""
        self._capacity: float | None = None
        self.connected = False
        self.error = "not connected yet"
        self.messages_total = 0
        self.malformed_total = 0

    # ---- the stream ---------------------------------------------------------------------------------------
    def feed(self, line: bytes) -> None:
        """Take one stream line; a malformed one raises ProtocolError (the caller reconnects)."""
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"state stream: a line is not JSON: {exc}") from exc
        kind = msg.get("kind") if isinstance(msg, dict) else None
        if kind == "model":
            self.model = MirroredModel.from_dict(msg)
            self._capacity = None
        elif kind == "state":
            self._apply_cache(msg.get("cache"))
            self._raw, self._state, self._view = msg, None, None
            self.received_at = time.monotonic()
        else:
            raise ProtocolError(f"state stream: unknown message kind {kind!r}", "kind")
        self.messages_total += 1

    def _apply_cache(self, change: object) -> None:
        if change is None:
            return
        if not isinstance(change, dict) or not all(isinstance(change.get(k), list) for k in ("added", "removed")):
            raise ProtocolError("state stream: 'cache' must be an object with 'added' and 'removed' lists", "cache")
        if not all(isinstance(h, int) for h in change["added"]):
            raise ProtocolError("state stream: cache.added must hold block hashes (integers)", "cache")
        self.cache.apply(change["added"], change["removed"], reset=bool(change.get("reset")))
        self.cache_source = str(change.get("source", ""))

    async def follow(self, client: aiohttp.ClientSession, url: str, retry_s: float = 0.5) -> None:
        """Keep the stream open for as long as the task runs, reconnecting after any failure."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=2.0)
        while True:
            try:
                async with client.get(url + "/state/stream", timeout=timeout) as resp:
                    resp.raise_for_status()
                    self.connected, self.error = True, ""
                    buf = bytearray()
                    async for chunk in resp.content.iter_any():
                        buf += chunk
                        if b"\n" in chunk:  # a long message arrives in many chunks: split once it is whole
                            *lines, rest = buf.split(b"\n")
                            buf = bytearray(rest)
                            for line in lines:
                                if line:
                                    self.feed(line)
                        if len(buf) > MAX_LINE_BYTES:
                            raise ProtocolError(f"state stream: a message exceeds {MAX_LINE_BYTES} bytes")
                    self.error = "the side-car closed its state stream"
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.error = f"state stream from {url} broke: {exc!r}"
            except ProtocolError as exc:
                self.malformed_total += 1
                self.error = f"state stream from {url} is malformed: {exc}"
                log.warning("mirror %s: %s", self.name, self.error)
            self.connected, self._raw, self._state, self._view = False, None, None, None
            self.cache = BlockSet()  # the next connection starts from a full set
            await asyncio.sleep(retry_s)

    # ---- what a decision reads ----------------------------------------------------------------------------
    def age(self) -> float:
        """Seconds since the newest state message arrived."""
        return time.monotonic() - self.received_at

    @property
    def engine_ok(self) -> bool:
        """What the newest state message says of the engine's health."""
        return self._raw is not None and self._raw.get("engine_ok") is not False

    def usable(self, max_age_s: float) -> bool:
        return self.connected and self.model is not None and self._raw is not None and self.age() <= max_age_s

    def state(self) -> MirroredState:
        """The newest state, turned into an InstanceState on first use."""
        if self._state is None:
            assert self._raw is not None, "state() on a mirror with no state"
            try:
                self._state = MirroredState.from_dict(self._raw)
            except ProtocolError:
                self.malformed_total += 1
                self._raw = None  # not used again until the stream sends a good one
                raise
        return self._state

    def view(self, pending: list[Request]) -> StateView:
        """The newest state with this scheduler's unseen dispatches: what its candidate and prediction use.
        The side-car numbers its requests from 0 and the dispatches come numbered below -1 (-1 is the
        candidate's, ``DISPATCH_IDS``), so no fork holds two requests with one id."""
        if self._view is None:
            self._view = StateView(self.received_at, self.state().state, self.cache)
        self._view.pending = pending
        return self._view

    def capacity(self, config: EngineConfig) -> float:
        """The instance's peak tokens per (real) second by its side-car's own timing model: llm-d's R_peak,
        what the capacity-normalised policies weigh instances by."""
        assert self.model is not None
        if self._capacity is None:
            self._capacity = peak_token_throughput(self.model.predictor.timing, config) * self.model.time_scale
        return self._capacity

    @property
    def known_capacity(self) -> float | None:
        """The capacity computed while the mirror was current, for decisions made while it is not."""
        return self._capacity

    def now(self) -> float:
        """The side-car's clock now (emulated seconds), from its clock in the newest state."""
        assert self.model is not None
        return self.state().state.clock + max(0.0, self.age()) * self.model.time_scale

    def predict(self, view: StateView, request: Request, target: str, with_impact: bool = False) -> Prediction:
        """The side-car's prediction, made here with the side-car's own predictor."""
        assert self.model is not None
        candidate = request if request.id == CANDIDATE_ID else replace(request, id=CANDIDATE_ID)
        pred = view.predict(self.model.predictor, self.name, candidate, target, self.now(), with_impact)
        return pred.in_wall_seconds(self.model.time_scale)

    def describe(self) -> dict:
        return {"connected": self.connected, "error": self.error, "age_s": round(self.age(), 4)
                if self._raw is not None else None, "messages_total": self.messages_total,
                "malformed_total": self.malformed_total,
                "predictor": self.model.predictor.label if self.model else None,
                "prefix_cache": {"source": self.cache_source, "blocks": self.cache.size}}
