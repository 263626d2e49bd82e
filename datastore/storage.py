"""The store's data plane: a storage unit holds the payload of its shard of rows as Arrow record batches.

A put arrives as one record batch (an `index` column plus the fields written); the unit keeps the batch
whole and remembers, per field, where each row's value sits. A get assembles the requested fields of
the requested rows with Arrow `take`, so no value is turned into a Python object on the way.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import ray

INDEX = "index"


class Shard:
    """Payload of one unit: record batches plus a per-field index -> (batch, row) map."""

    def __init__(self) -> None:
        self.batches: dict[str, list[pa.RecordBatch]] = defaultdict(list)
        self.where: dict[str, dict[str, dict[int, tuple[int, int]]]] = defaultdict(lambda: defaultdict(dict))
        self.types: dict[str, dict[str, pa.DataType]] = defaultdict(dict)

    def put(self, partition: str, batch: pa.RecordBatch) -> list[int]:
        for name in batch.schema.names:
            if name == INDEX:
                continue
            known = self.types[partition].get(name)
            got = batch.schema.field(name).type
            if known is not None and known != got and not pa.types.is_null(got):
                raise TypeError(f"field '{name}' of partition '{partition}' was {known}, this put gives {got}")
            if known is None or pa.types.is_null(known):
                self.types[partition][name] = got
        batches = self.batches[partition]
        batches.append(batch)
        b = len(batches) - 1
        indexes = batch.column(INDEX).to_pylist()
        for name in batch.schema.names:
            if name == INDEX:
                continue
            col = self.where[partition][name]
            for row, idx in enumerate(indexes):
                col[idx] = (b, row)
        return indexes

    def get(self, partition: str, indexes: list[int], fields: list[str]) -> pa.Table:
        where = self.where[partition]
        batches = self.batches[partition]
        arrays = [pa.array(indexes, pa.int64())]
        for name in fields:
            if name not in where:
                raise KeyError(f"field '{name}' is not held for partition '{partition}'")
            loc = where[name]
            missing = [i for i in indexes if i not in loc]
            if missing:
                raise KeyError(f"field '{name}' of partition '{partition}' is missing for rows {missing[:8]}")
            pieces = []
            for i in indexes:
                b, row = loc[i]
                pieces.append(batches[b].column(name).slice(row, 1))
            arrays.append(pa.concat_arrays(pieces).cast(self.types[partition][name]) if pieces
                          else pa.array([], self.types[partition][name]))
        return pa.table(arrays, names=[INDEX, *fields])

    def nbytes(self) -> int:
        return sum(b.nbytes for bs in self.batches.values() for b in bs)


@ray.remote(num_cpus=0, max_concurrency=1000)
class StorageUnit:
    """Async actor holding one shard; after storing a put it reports readiness to the controller."""

    def __init__(self, unit_id: int, controller: ray.actor.ActorHandle, tag_fields: list[str]) -> None:
        self.unit_id, self.controller, self.tag_fields = unit_id, controller, tag_fields
        self.shard = Shard()

    async def put(self, partition: str, batch: pa.RecordBatch) -> int:
        indexes = self.shard.put(partition, batch)
        fields = [n for n in batch.schema.names if n != INDEX]
        tags = {t: batch.column(t).to_pylist() for t in self.tag_fields if t in fields}
        await self.controller.mark_ready.remote(partition, indexes, fields, self.unit_id, tags)
        return len(indexes)

    async def get(self, partition: str, indexes: list[int], fields: list[str]) -> pa.Table:
        return self.shard.get(partition, indexes, fields)

    async def nbytes(self) -> int:
        return self.shard.nbytes()
