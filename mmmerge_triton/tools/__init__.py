"""The tooling around the merge: the benchmark (``mmmerge-bench``), the tuning sweep and its held-out check
(``mmmerge-tune``), the report of their JSON files (``mmmerge-report``), and what they share (cases, timing,
suites).

The runtime never imports this subpackage; it calls the runtime through the package's public functions,
except where a module docstring says otherwise (the bare PyTorch baselines and the kernel configurations the
sweep launches directly).
"""
