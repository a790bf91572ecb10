import os
import tempfile

# One Inductor cache for the whole run (set before torch is imported by any test module).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "simigrad-test-inductor-cache"))
os.environ.setdefault("TRITON_INTERPRET", "1")
