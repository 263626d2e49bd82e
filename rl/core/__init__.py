"""The bottom layer: what the rollout, trainer and data-store packages may import from `rl`.

Recipe schema (`config`), bounded waits (`waits`), the weight channel (`transport`), the staleness rule
(`staleness`), loss and advantage maths (`algorithms`), reward calling (`scoring`), plugin loading
(`plugins`), GPU placement (`placement`) and the process heap (`heap`). Nothing here imports `rollout`,
`trainer`, `datastore` or the rest of `rl`; the top layer (controller, stages, CLI, jobs, benchmarks,
dashboard) imports everything. `tests/test_layers.py` keeps the arrows one way.
"""
