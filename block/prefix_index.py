"""What a router can know about the prefixes cached on each instance, from two sources.

**Exact** (``ExactPrefixView``): the instance's own prefix cache, read from its state, as vLLM's KV events
(BlockStored / BlockRemoved) let llm-d's precise scorer and Dynamo's KV indexer mirror it. Offline it is
the snapshot the router already polls, so it is as stale as the rest of the state.

**Approximate** (``ApproximatePrefixIndex``): the router remembers the prompt blocks it sent to each
instance, per instance an LRU set bounded by the instance's KV blocks, as llm-d's approximate prefix
index (per-pod LRU auto-sized from ``num_gpu_blocks``), SGLang's router radix tree, AIBrix and Preble keep
it. It never sees evictions, answers or other routers' traffic; it only knows what it routed.

**Live**, a side-car learns its instance's cached blocks exactly from the engine (the emulator's
``/kv_cache``, as vLLM's KV events would give them) or, for an engine that shows none, approximately from
the prompts it proxied; it streams them to the schedulers as changes of a ``BlockSet``.

Both count leading full blocks of the request's *prompt* (its hashes up to ``prompt_tokens //
block_size``): an answer's blocks are the future, which no router may read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence

from simulator.engine import CachedRun, InstanceState
from simulator.workload import Request


def prompt_hashes(request: Request, block_size: int) -> tuple[int, ...]:
    """The chained hashes of the request's full prompt blocks, the part of its chain a router can compute."""
    return request.block_hashes[: request.prompt_tokens // block_size]


def _leading_run(members: OrderedDict[int, None], hashes: Sequence[int]) -> int:
    """How many leading hashes are members, by bisection: the index keeps each chain prefix-closed (a block
    is always touched after the blocks it continues, so it is never evicted before them)."""
    if not hashes or hashes[0] not in members:
        return 0
    good, bad = 0, len(hashes)
    while bad - good > 1:
        mid = (good + bad) // 2
        if hashes[mid] in members:
            good = mid
        else:
            bad = mid
    return good + 1


class ApproximatePrefixIndex:
    """Per instance, the prompt block hashes this router sent there, least recently routed evicted first.

    ``record`` inserts a prompt's blocks tail first, so a chain's head is the most recently used and its
    tail is evicted before its head, as a radix tree evicts leaves first; each instance holds at most
    ``capacity`` blocks (the instance's KV blocks, as llm-d sizes its index from ``num_gpu_blocks``).
    """

    def __init__(self) -> None:
        self._sets: dict[str, OrderedDict[int, None]] = {}

    def match(self, instance: str, hashes: Sequence[int]) -> int:
        members = self._sets.get(instance)
        return _leading_run(members, hashes) if members else 0

    def size(self, instance: str) -> int:
        """Blocks indexed for the instance: SGLang's 'tree size' of that worker."""
        members = self._sets.get(instance)
        return len(members) if members else 0

    def members(self, instance: str) -> Collection[int]:
        """The block hashes indexed for the instance (a live view)."""
        return self._sets.setdefault(instance, OrderedDict()).keys()

    def record(self, instance: str, hashes: Sequence[int], capacity: int) -> None:
        """The router sent a prompt with these block hashes to ``instance``."""
        if capacity < 1:
            raise ValueError(f"approximate prefix index: capacity must be >= 1 block, got {capacity}")
        members = self._sets.setdefault(instance, OrderedDict())
        for h in reversed(hashes):
            if h in members:
                members.move_to_end(h)
            else:
                members[h] = None
        while len(members) > capacity:
            members.popitem(last=False)


class ExactPrefixView:
    """The prefix cache of one instance state, for matching requests against it (the KV-events view)."""

    def __init__(self, state: InstanceState):
        self._runs: dict[int, CachedRun] = {run.hashes[0]: run for run in state.cached}
        self.size = sum(run.size for run in state.cached if run.refs or run.evict >= 0)

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of the chain cached on the instance, held or evictable."""
        depth, parent = 0, None
        while depth < len(hashes):
            run = self._runs.get(hashes[depth])
            if run is None or run.parent != parent:
                return depth
            if not run.refs and run.evict < 0:  # evicted; kept only because cached runs continue it
                return depth
            stop = min(len(hashes), depth + run.size)
            j = depth + 1
            while j < stop and run.hashes[j - depth] == hashes[j]:
                j += 1
            if j < depth + run.size:
                return j
            depth, parent = j, run.hashes[0]
        return depth


class BlockSet:
    """The cached prefix blocks of one instance as a set of chained hashes: what a side-car knows of its
    engine's cache and streams to the schedulers as changes (blocks stored, blocks removed), the way vLLM's
    KV events let llm-d and Dynamo mirror an engine's cache. A request hits the leading blocks of its chain
    that are members."""

    def __init__(self, members: Collection[int] | None = None):
        self.members: Collection[int] = set() if members is None else members
        self.version = 0  # bumped on every change, so a stream sends changes only when there are some

    @property
    def size(self) -> int:
        return len(self.members)

    def match(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.members:
                break
            n += 1
        return n

    def replace(self, hashes: Iterable[int]) -> None:
        new = set(hashes)
        if new != self.members:
            self.members = new
            self.version += 1

    def apply(self, added: Iterable[int], removed: Iterable[int], reset: bool = False) -> None:
        members = set() if reset else set(self.members)
        members.difference_update(removed)
        members.update(added)
        self.members = members
        self.version += 1

    def changes(self, sent: set[int]) -> tuple[list[int], list[int], set[int]]:
        """(added, removed) since a reader was sent ``sent``, and what it has after them."""
        now = set(self.members)
        return list(now - sent), list(sent - now), now
