"""The store's bookkeeping, as a plain class: which fields of which rows are ready, who took which rows,
which rows are still needed. No Ray and no asyncio here, so every rule is unit-tested directly.

Rules kept here:
- A consumer gets a row at most once (take or discard both count), and only when every field it asks
  for is ready. Each consumer keeps, per set of fields it asks for, the set of rows ready for it and not
  yet taken ("candidates"), updated as fields arrive, so a take never scans the rows already consumed.
- A take is a lease: its rows stay in memory until the taker is done with them, i.e. until the same owner
  (one thread or asyncio task of one process, for one consumer name) takes again, or releases, or the
  lease expires. This is what lets "take, then fetch the payload" be safe against eviction.
- Eviction: a row is dropped once every required consumer took or discarded it, no lease holds it, and
  it is finished (has every finished field: a producer that writes after taking, like the reward worker,
  still needs its row).
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

OPS = {
    ">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}

Where = Mapping[str, tuple[str, Any]]
#: (partition, storage unit, row index) of a row the ledger dropped; the unit must drop its payload
Evicted = tuple[str, int, int]


def check_where(where: Where | None, tag_fields: Iterable[str] | None) -> None:
    """ValueError for a malformed condition, KeyError for a tag the store does not keep."""
    for tag, cond in (where or {}).items():
        if not isinstance(cond, (tuple, list)) or len(cond) != 2:
            raise ValueError(f"where[{tag!r}] must be (op, value), e.g. ('>=', 3); got {cond!r}")
        if cond[0] not in OPS:
            raise ValueError(f"where[{tag!r}] uses unknown operator {cond[0]!r}; valid: {', '.join(OPS)}")
        if tag_fields is not None and tag not in tag_fields:
            raise KeyError(f"where on {tag!r}, which is not a tag field of this store; tag fields: "
                           f"{sorted(tag_fields)} (set them with DataStore.create(tag_fields=...))")


def matches(tags: Mapping[str, Any], where: Where | None) -> bool:
    return not where or all(t in tags and OPS[op](tags[t], v) for t, (op, v) in where.items())


class IndexSet:
    """A set of non-negative ints kept as a low-water mark (all below it are members) plus the members above.

    Evicted rows are mostly a growing prefix of the indexes, so this stays small for a whole run.
    """

    def __init__(self, members: Iterable[int] = ()) -> None:
        self.low = 0
        self.above: set[int] = set()
        for i in members:
            self.add(i)

    def add(self, i: int) -> None:
        if i < self.low:
            return
        self.above.add(i)
        while self.low in self.above:
            self.above.remove(self.low)
            self.low += 1

    def __contains__(self, i: int) -> bool:
        return i < self.low or i in self.above

    def merge(self, other: "IndexSet") -> None:
        if not len(self):
            self.low, self.above = other.low, set(other.above)
        else:
            for i in other:
                self.add(i)

    def __len__(self) -> int:
        return self.low + len(self.above)

    def __iter__(self):
        yield from range(self.low)
        yield from sorted(self.above)


class SortedIndexes:
    """Row indexes kept sorted, so "oldest first" is a walk from the front instead of a sort per take.

    Rows mostly arrive in increasing index order (append) and are mostly taken from the front (a slice
    delete), so both are cheap; anything else is a bisect and a memmove."""

    def __init__(self, items: Iterable[int] = ()) -> None:
        self.items: list[int] = sorted(set(items))
        self.members: set[int] = set(self.items)

    def add(self, i: int) -> None:
        if i in self.members:
            return
        self.members.add(i)
        if not self.items or i > self.items[-1]:
            self.items.append(i)
        else:
            bisect.insort(self.items, i)

    def discard(self, i: int) -> None:
        if i in self.members:
            self.members.remove(i)
            k = bisect.bisect_left(self.items, i)
            del self.items[k]

    def discard_many(self, idxs: Iterable[int]) -> None:
        idxs = [i for i in idxs if i in self.members]
        if not idxs:
            return
        m = len(idxs)
        if self.items[:m] == sorted(idxs):
            del self.items[:m]
            self.members.difference_update(idxs)
        else:
            for i in idxs:
                self.discard(i)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __contains__(self, i: int) -> bool:
        return i in self.members


@dataclass
class Take:
    """What a consumer got: row indexes in order and the storage unit holding each.

    `take_id` names the lease (for `release`); a Take built by hand (e.g. one rank's share) keeps -1."""

    indexes: list[int]
    units: list[int]
    take_id: int = -1
    consumer: str = ""


@dataclass(slots=True)
class RowMeta:
    unit: int
    fields: set[str] = field(default_factory=set)
    tags: dict[str, Any] = field(default_factory=dict)
    nbytes: float = 0.0
    done: int = 0  # required consumers that took or discarded the row
    holds: int = 0  # leases (takes not yet released) that include the row


class Consumer:
    """One consumer's view of a partition."""

    def __init__(self) -> None:
        self.taken: set[int] = set()  # held rows it took or discarded (evicted rows leave this set)
        self.ready: dict[frozenset[str], SortedIndexes] = {}  # per field set asked for: ready, untaken rows
        self.gen: dict[frozenset[str], int] = defaultdict(int)  # bumps when a candidate row appears/changes
        self.rows_taken = 0
        self.rows_discarded = 0


class Partition:
    def __init__(self) -> None:
        self.rows: dict[int, RowMeta] = {}
        self.evicted = IndexSet()
        self.consumers: dict[str, Consumer] = {}
        self.ready_count: dict[str, int] = defaultdict(int)
        self.known_fields: set[str] = set()
        self.nbytes = 0.0

    def consumer(self, name: str) -> Consumer:
        c = self.consumers.get(name)
        if c is None:
            c = self.consumers[name] = Consumer()
        return c


@dataclass
class Lease:
    owner: str
    partition: str
    indexes: list[int]
    deadline: float


class Ledger:
    """Metadata of every row held: readiness per field, small tag values, consumption and leases."""

    def __init__(self, required: Iterable[str] = (), finished_fields: Iterable[str] = (),
                 declared: Iterable[str] = (), tag_fields: Iterable[str] | None = None,
                 lease_s: float = 600.0) -> None:
        self.required = tuple(dict.fromkeys(required))
        self.required_set = frozenset(self.required)
        self.finished = frozenset(finished_fields)
        self.declared = set(declared)
        self.tag_fields = None if tag_fields is None else set(tag_fields)
        self.lease_s = lease_s
        self.parts: dict[str, Partition] = {}
        self.types: dict[str, dict[str, Any]] = defaultdict(dict)
        self.leases: OrderedDict[int, Lease] = OrderedDict()  # in deadline order (lease_s is fixed)
        self.owner_takes: dict[str, list[int]] = defaultdict(list)
        self._ids = itertools.count(1)
        self.puts = self.rows_created = self.rows_taken = self.rows_discarded = self.rows_evicted = 0
        self.takes = 0
        self.refused = 0

    def part(self, partition: str) -> Partition:
        p = self.parts.get(partition)
        if p is None:
            p = self.parts[partition] = Partition()
        return p

    # ------------------------------------------------------------------ writes
    def register_types(self, partition: str, types: Mapping[str, Any]) -> dict[str, Any]:
        """Fix each field's type at its first (non-null) write; TypeError when a later write differs."""
        known = self.types[partition]
        for name, typ in types.items():
            have = known.get(name)
            if have is None:
                known[name] = typ
            elif str(have) != str(typ):
                raise TypeError(f"field '{name}' of partition '{partition}' holds {have}; this put gives {typ}")
        return {name: known[name] for name in types}

    def mark_ready(self, partition: str, indexes: list[int], fields: list[str], unit: int,
                   tags: Mapping[str, list[Any]], nbytes: float = 0.0) -> tuple[list[int], list[Evicted]]:
        """Record that `fields` of `indexes` are stored on `unit`. Returns (refused, evicted): rows
        already evicted (a late write, refused) and rows this write completed and that nobody needs."""
        part = self.part(partition)
        refused: list[int] = []
        evicted: list[Evicted] = []
        share = nbytes / len(indexes) if indexes else 0.0
        fset = frozenset(fields)
        rows, ready_count = part.rows, part.ready_count
        req_taken = [part.consumers[r].taken for r in self.required if r in part.consumers]
        needs = [(c, need, cand) for c in part.consumers.values() for need, cand in c.ready.items()]
        tag_items = list(tags.items())
        bumped: set[tuple[int, frozenset[str]]] = set()
        created = 0
        for k, idx in enumerate(indexes):
            if idx in part.evicted:
                refused.append(idx)
                continue
            meta = rows.get(idx)
            if meta is None:
                meta = rows[idx] = RowMeta(unit=unit, fields=set(fset))
                meta.done = sum(1 for t in req_taken if idx in t)
                created += 1
                was_finished, new = False, True
            else:
                was_finished = self.finished <= meta.fields
                added = fset - meta.fields
                for f in added:
                    meta.fields.add(f)
                    ready_count[f] += 1
                new = bool(added)
            for tag, values in tag_items:
                meta.tags[tag] = values[k]
            meta.nbytes += share
            part.nbytes += share
            for c, need, cand in needs:
                if idx not in c.taken and need <= meta.fields:
                    cand.add(idx)
                    bumped.add((id(c), need))
            if new and not was_finished and self._evictable(meta):
                evicted.append(self._evict(partition, part, idx))
        for f in fset:
            ready_count[f] += created
        for c, need, _ in needs:
            if (id(c), need) in bumped:
                c.gen[need] += 1
        part.known_fields.update(fields)
        self.rows_created += created
        self.puts += 1
        self.refused += len(refused)
        return refused, evicted

    # ------------------------------------------------------------------ reads
    def check_take(self, partition: str, fields: list[str], where: Where | None) -> None:
        """KeyError at once for a field no producer writes or a tag the store does not keep."""
        known = self.declared | self.part(partition).known_fields
        unknown = [f for f in fields if f not in known]
        if unknown and self.declared:
            raise KeyError(f"get of field(s) {unknown} in partition '{partition}': no producer writes them; "
                           f"known fields: {sorted(known)}")
        check_where(where, self.tag_fields)

    def generation(self, partition: str, consumer: str, fields: list[str]) -> int:
        """Changes whenever a row ready for (consumer, fields) appears or changes: a waiting take retries
        only then."""
        c = self.part(partition).consumers.get(consumer)
        return -1 if c is None else c.gen.get(frozenset(fields), -1)

    def try_take(self, partition: str, consumer: str, fields: list[str], n: int, min_n: int,
                 group_size: int | None, where: Where | None, owner: str = "", now: float = 0.0) -> Take | None:
        """Up to `n` eligible rows (whole groups when `group_size`), oldest first, if at least `min_n`."""
        part = self.part(partition)
        c = part.consumer(consumer)
        need = frozenset(fields)
        cand = c.ready.get(need)
        if cand is None:
            cand = c.ready[need] = SortedIndexes(i for i, m in part.rows.items() if i not in c.taken and need <= m.fields)
            c.gen.setdefault(need, 0)
        if len(cand) < max(min_n, 1, group_size or 1):
            return None
        order: Iterable[int] = cand
        if where:
            order = (i for i in cand if matches(part.rows[i].tags, where))
        if group_size:
            picked = self._whole_groups(order, group_size, n)
        else:
            picked = list(itertools.islice(order, n))
        if len(picked) < max(min_n, 1):
            return None
        self._mark_taken(part, c, consumer, picked)
        c.rows_taken += len(picked)
        self.rows_taken += len(picked)
        self.takes += 1
        take_id = next(self._ids)
        for i in picked:
            part.rows[i].holds += 1
        self.leases[take_id] = Lease(owner, partition, picked, now + self.lease_s)
        self.owner_takes[owner].append(take_id)
        return Take(indexes=picked, units=[part.rows[i].unit for i in picked], take_id=take_id, consumer=consumer)

    @staticmethod
    def _whole_groups(order: Iterable[int], size: int, n: int) -> list[int]:
        """Complete groups, oldest first, walking `order` (sorted) only as far as needed."""
        picked: list[int] = []
        if size > n:
            return picked
        group, members = -1, []
        for i in order:
            g = i // size
            if g != group:
                group, members = g, []
            members.append(i)
            if len(members) == size:
                picked.extend(members)
                if len(picked) + size > n:
                    break
        return picked

    def discard(self, partition: str, consumer: str, where: Where | None,
                group_size: int | None = None, indexes: Iterable[int] | None = None) -> tuple[list[int], list[Evicted]]:
        """Mark as taken by `consumer`, without delivering them, the held rows matching `where` (only
        among `indexes` when given), and the rest of their groups when `group_size`. For samples too
        stale to train on, or groups that can never complete."""
        part = self.part(partition)
        c = part.consumer(consumer)
        among = part.rows.keys() if indexes is None else [i for i in set(indexes) if i in part.rows]
        hit = [i for i in among if i not in c.taken and matches(part.rows[i].tags, where)]
        if group_size and hit:
            groups = {i // group_size for i in hit}
            hit = [i for i in part.rows if i // group_size in groups and i not in c.taken]
        hit.sort()
        self._mark_taken(part, c, consumer, hit)
        c.rows_discarded += len(hit)
        self.rows_discarded += len(hit)
        evicted = [self._evict(partition, part, i) for i in hit if self._evictable(part.rows[i])]
        return hit, evicted

    def _mark_taken(self, part: Partition, c: Consumer, name: str, idxs: list[int]) -> None:
        c.taken.update(idxs)
        for cand in c.ready.values():
            cand.discard_many(idxs)
        if name in self.required_set:
            for i in idxs:
                part.rows[i].done += 1

    # ------------------------------------------------------------------ leases and eviction
    def release_take(self, take_id: int) -> list[Evicted]:
        lease = self.leases.pop(take_id, None)
        if lease is None:
            return []
        mine = self.owner_takes.get(lease.owner)
        if mine and take_id in mine:
            mine.remove(take_id)
            if not mine:
                del self.owner_takes[lease.owner]
        part = self.part(lease.partition)
        out = []
        for i in lease.indexes:
            meta = part.rows.get(i)
            if meta is None:
                continue
            meta.holds -= 1
            if self._evictable(meta):
                out.append(self._evict(lease.partition, part, i))
        return out

    def release_owner(self, owner: str) -> list[Evicted]:
        """The owner is done with every row it took before (it is asking for more, or said so)."""
        out: list[Evicted] = []
        for take_id in list(self.owner_takes.get(owner, ())):
            out.extend(self.release_take(take_id))
        return out

    def expire(self, now: float) -> list[Evicted]:
        """Release leases past their deadline (a consumer that died or never came back)."""
        out: list[Evicted] = []
        while self.leases:
            take_id, lease = next(iter(self.leases.items()))
            if lease.deadline > now:
                break
            out.extend(self.release_take(take_id))
        return out

    def next_deadline(self) -> float | None:
        return next(iter(self.leases.values())).deadline if self.leases else None

    def _evictable(self, meta: RowMeta) -> bool:
        return (bool(self.required) and meta.done >= len(self.required) and meta.holds <= 0
                and self.finished <= meta.fields)

    def _evict(self, partition: str, part: Partition, idx: int) -> Evicted:
        meta = part.rows.pop(idx)
        for f in meta.fields:
            part.ready_count[f] -= 1
        part.nbytes -= meta.nbytes
        part.evicted.add(idx)
        for c in part.consumers.values():
            c.taken.discard(idx)
            for cand in c.ready.values():
                cand.discard(idx)
        self.rows_evicted += 1
        return (partition, meta.unit, idx)

    # ------------------------------------------------------------------ recovery
    def restore(self, partition: str, consumed: Mapping[str, Iterable[int]],
                evicted: IndexSet | None = None) -> list[Evicted]:
        """After replaying a log: rows each consumer had taken (only held rows count) and rows that were
        evicted before the restart (a late write to them is refused)."""
        part = self.part(partition)
        if evicted is not None:
            part.evicted.merge(evicted)
        for name, idxs in consumed.items():
            c = part.consumer(name)
            present = sorted(i for i in set(idxs) if i in part.rows and i not in c.taken)
            self._mark_taken(part, c, name, present)
        return [self._evict(partition, part, i) for i in list(part.rows) if self._evictable(part.rows[i])]

    # ------------------------------------------------------------------ observability
    def held(self, partition: str, consumer: str | None = None) -> list[int]:
        """Indexes of the rows held (not yet taken by `consumer`, when given), sorted."""
        part = self.parts.get(partition) or Partition()
        taken = part.consumers[consumer].taken if consumer in part.consumers else set()
        return sorted(i for i in part.rows if i not in taken)

    def counts(self, partition: str, consumer: str | None = None) -> dict[str, Any]:
        """Rows held, ready count per field, and rows not yet taken by `consumer`."""
        part = self.parts.get(partition) or Partition()
        out: dict[str, Any] = {"rows": len(part.rows), "ready": {f: n for f, n in part.ready_count.items() if n}}
        if consumer is not None:
            c = part.consumers.get(consumer)
            out["untaken"] = len(part.rows) - (len(c.taken) if c else 0)
        return out

    def partition_stats(self, partition: str) -> dict[str, Any]:
        part = self.parts[partition]
        rows = len(part.rows)
        fields = sorted(self.declared | part.known_fields)
        held = defaultdict(int)
        for lease in self.leases.values():
            if lease.partition == partition:
                held[self._lease_consumer(lease)] += len(lease.indexes)
        consumers = {}
        for name, c in part.consumers.items():
            consumers[name] = {
                "untaken": rows - len(c.taken),
                "depth": max((len(s) for s in c.ready.values()), default=0),
                "depth_by_fields": {",".join(sorted(k)): len(s) for k, s in c.ready.items()},
                "in_flight": held.get(name, 0),
                "rows_taken": c.rows_taken, "rows_discarded": c.rows_discarded,
            }
        return {
            "rows": rows, "bytes": int(part.nbytes), "evicted": len(part.evicted),
            "finished": sum(1 for m in part.rows.values() if self.finished <= m.fields) if self.finished else rows,
            "ready": {f: part.ready_count.get(f, 0) for f in fields},
            "unready": {f: rows - part.ready_count.get(f, 0) for f in fields},
            "consumers": consumers,
        }

    @staticmethod
    def _lease_consumer(lease: Lease) -> str:
        return lease.owner.split("@", 1)[0]

    def holders(self) -> str:
        """Why rows are held, in words: for the error of a put that found the store full."""
        parts = []
        for name, part in self.parts.items():
            if not part.rows:
                continue
            st = self.partition_stats(name)
            bits = [f"partition '{name}': {st['rows']} rows held"]
            for r in self.required:
                c = st["consumers"].get(r, {"untaken": st["rows"], "in_flight": 0, "depth": 0})
                asked = r in part.consumers and part.consumers[r].ready  # depth is known once it asked
                bits.append(f"{c['untaken']} not yet taken by '{r}'"
                            + (f" ({c['depth']} of them ready for it)" if asked else " (it has not asked yet)"))
                if c["in_flight"]:
                    bits.append(f"{c['in_flight']} taken by '{r}' and not yet released")
            missing = {f: n for f, n in st["unready"].items() if n and f in self.finished}
            if missing:
                bits.append(f"rows missing finished fields: {missing}")
            parts.append(", ".join(bits))
        if not self.required:
            parts.append("no required consumers were given, so no row is ever evicted "
                         "(DataStore.create(required_consumers=[...]))")
        return "; ".join(parts) or "no rows are held"
