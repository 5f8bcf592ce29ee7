"""Real checkpoints made on this machine, for the tests, the demo and the benchmarks (never imported by a merge).

- `synthetic`: tiny models trained with FSDP2 on CPU processes (gloo) and saved as veRL saves them,
  with an oracle gathered by torch's own full-state APIs (the `make_ckpt` test fixture, the demo).
- `rankfiles`: DTensor rank files cut from full tensors in one process: any placement on any mesh.
- `presets`: large checkpoints with the shapes of public models, written fast (benchmarks).
- `memcg`: run a command under a memory cgroup (memory-bound tests and benchmarks).
- `demo`: `streammerge demo`.
"""
