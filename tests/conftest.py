import os
import sys
import tempfile
from pathlib import Path

# Tests never write into the user's cache (the embedding cache, JAX's compilation cache): the CLI
# verbs and subprocesses started by the tests use this throw-away root instead.
os.environ.setdefault("SOTJAX_CACHE", tempfile.mkdtemp(prefix="sotjax-test-cache-"))

sys.path.insert(0, str(Path(__file__).parent))
