import os
import sys

# shared test helpers (tiny.py, strategies.py) import as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
# kernels chosen by the table's rules, not timed (deterministic; tests/runtime/test_kernels.py
# tests the timing and its cache on their own)
os.environ.setdefault("QDSL_KERNEL_AUTOTUNE", "0")
# ... and never the table this machine timed for its benchmarks (qdsl's cache dir): a
# loaded machine's timings can pick a bf16 kernel the exactness tests do not allow
import tempfile  # noqa: E402
os.environ.setdefault("QDSL_KERNEL_CACHE", tempfile.mkdtemp(prefix="qdsl-test-kernels-"))

from hypothesis import HealthCheck, settings

# CI: derandomized, so a green run is reproducible; locally: random.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
