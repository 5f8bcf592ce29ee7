"""Real checkpoints made on this machine, for the tests, the demo and the benchmarks (never imported by a merge).

`synthetic` trains tiny models with FSDP2 on CPU processes (gloo) and saves them as veRL does, with an
oracle gathered by torch's own full-state APIs; `demo` is `streammerge demo`.
"""
