import sys
from pathlib import Path

# deploy_harness and facts_for live beside the tests; make them importable without a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
