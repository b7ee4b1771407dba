import os
import sys
from pathlib import Path

# bitsandbytes wraps some CPU fallbacks in torch.compile, which recompiles for every shape: minutes of
# compile time for no numerical difference on these ops. The tests run them eagerly.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).parent))
