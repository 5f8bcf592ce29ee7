"""Write: execute a plan. Windows of each tensor are filled from source files (copied, cast or computed)
and written in place in output files whose headers the plan fixed; the output-folder transaction
(temp names, manifest, staged index, lock) makes a merge resumable and never half-visible.

Modules: `safetensors_format` (exact headers), `cast` (bit-exact casts without torch), `writer`
(windows, threads, positioned I/O), `compute` (LoRA folds), `manifest`, `transaction`, `torch_format`.
"""
