"""Legend entries in words for the metric keys whose names only make sense with docs/datastore.md open.

`metric_label(key)` is what a chart's legend shows for `key`; a key it does not know is shown as it is.
Each entry names what is counted and its unit, e.g. `datastore/train/depth/trainer` -> "rows ready for the
trainer (rows)". The reader sends the labels of every key it has seen with each snapshot and delta.
"""

from __future__ import annotations

import re

# the data store's per-partition figures: datastore/<partition>/<figure>/<consumer or field>
_PARTITION = re.compile(r"^datastore/(?P<partition>[^/]+)/(?P<figure>depth|in_flight|unready)/(?P<who>[^/]+)$")
_PARTITION_WORDS = {
    "depth": "rows ready for {who}, not taken yet",
    "in_flight": "rows {who} took and has not released",
    "unready": "rows still waiting for their {who}",
}
_CONSUMERS = {"trainer": "the trainer", "reward": "the reward workers"}
_STORE = {
    "datastore/waiting_puts": "writes blocked: store full (calls)",
    "datastore/waiting_takes": "takes waiting for rows (calls)",
    "datastore/rows_held": "rows held in the store (rows)",
}
_TIME = re.compile(r"^time/(?P<phase>.+)_s$")
_EVAL = re.compile(r"^eval/pass@(?P<k>\d+)$")


def metric_label(key: str) -> str:
    """What a legend says for `key`: words and a unit for the data store's queues and the step's phases."""
    if key in _STORE:
        return _STORE[key]
    m = _PARTITION.match(key)
    if m:
        who = m["who"] if m["figure"] == "unready" else _CONSUMERS.get(m["who"], m["who"])
        text = _PARTITION_WORDS[m["figure"]].format(who=who)
        partition = "" if m["partition"] == "train" else f", partition {m['partition']}"
        return f"{text}{partition} (rows)"
    if key == "eval/reward_mean":
        return "held-out reward (mean)"
    m = _EVAL.match(key)
    if m:
        return f"held-out pass@{m['k']} (share of prompts)"
    m = _TIME.match(key)
    if m:
        return f"{m['phase'].replace('_', ' ')} (s)"
    return key
