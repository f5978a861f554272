"""House rule 1: the maths never imports Lightning or Hydra (checked in a fresh interpreter).

Every module of the core packages is imported (``pkgutil.walk_packages``), not only the packages' ``__init__``:
a submodule that imports Hydra at module level (a CLI helper, say) breaks the rule too."""

import subprocess
import sys


def test_core_does_not_import_lightning_or_hydra():
    code = (
        "import sys\n"
        "import scoreflow, scoreflow.sde, scoreflow.weighting, scoreflow.losses, scoreflow.likelihood\n"
        "import scoreflow.dequantization, scoreflow.sampling, scoreflow.nets, scoreflow.oracles, scoreflow.data\n"
        "import scoreflow.metrics, scoreflow.visualize\n"
        "import importlib, pkgutil\n"
        "core = ('sde', 'likelihood', 'dequantization', 'sampling', 'nets', 'data', 'metrics')\n"
        "for pkg in core:\n"
        "    mod = importlib.import_module('scoreflow.' + pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, mod.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "for name in ('weighting', 'losses', 'oracles', 'utils', 'visualize'):\n"
        "    importlib.import_module('scoreflow.' + name)\n"
        "heavy = ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core modules imported: {out.stdout.strip()}"
