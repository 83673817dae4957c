"""The FID Inception network, registered with torch-fidelity as two feature extractors.

Both run the same network (the TF 2015-12-05 Inception-v3 that ADM, torch-fidelity,
pytorch-fid and clean-fid use) and give the same features:

- `reals-inception-torch-fidelity`: torch-fidelity's own module and weight file (downloaded
  into the torch hub cache, or a local file). It has the classifier, so Inception Score works.
- `reals-inception-offline`: the TorchScript file from the offline assets
  (`reals assets fetch inception-fid`). It has no classifier layer: no Inception Score.

Each takes uint8 N x 3 x H x W images, resizes them to 299 with torch-fidelity's
TF1-exact bilinear resize and maps 0..255 to (x - 128) / 128, as the TF graph does, and
gives '2048' (pool features), SFID_FEATURE (ADM's sFID vector) and, where the classifier
exists, 'logits_unbiased' (the logits without bias, what IS is computed from).
Importing this module registers both with torch-fidelity, so that its own
`calculate_metrics(..., feature_extractor=OFFLINE)` runs the same network.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ..artifacts import torch_load
from ..errors import UserError

OFFLINE = "reals-inception-offline"
TORCH_FIDELITY = "reals-inception-torch-fidelity"
EXTRACTORS = ("auto", "offline", "torch-fidelity")

# ADM's sFID features: `mixed_6/conv` (the 1x1 branch of the 7th mixed block, 192 x 17 x 17
# after ReLU), channels [:7], flattened in ADM's NHWC order to 17 * 17 * 7 = 2023 values.
# torch-fidelity names features by their width ('64', '768', '2048'), so this one is '2023'.
SFID_FEATURE = "2023"
SFID_CHANNELS = 7
POOL_FEATURE = "2048"
LOGITS_FEATURE = "logits_unbiased"
INPUT_SIZE = 299
DOWNLOAD_TIMEOUT_S = 60  # urllib waits forever by default; a blackholed network must fail


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32 N x 3 x 299 x 299 in [-1, 1), exactly as torch-fidelity feeds its Inception."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 N x 3 x H x W images, got {images.dtype} {tuple(images.shape)}")
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
    return (x - 128) / 128


def sfid_vector(spatial: torch.Tensor) -> torch.Tensor:
    """N x C x 17 x 17 `mixed_6/conv` map -> N x 2023 float32 (channels [:7], NHWC flattening as ADM)."""
    return spatial[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(spatial.shape[0], -1).float()


def load_torchscript(path: str | Path, sha256: str | None = None) -> torch.jit.ScriptModule:
    """The TorchScript Inception in `path`; with `sha256`, only if its bytes have that hash (the
    bytes hashed are the bytes loaded: the file is read once)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception TorchScript file not found: {path}; run `reals assets fetch inception-fid`")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path} does not have the sha256 of the FID Inception asset (corrupt or replaced); "
                        f"run `reals assets fetch inception-fid --force`")
    try:
        with warnings.catch_warnings():  # torch >= 2.9 warns that jit.load is deprecated; it is what the asset is
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(io.BytesIO(data), map_location="cpu")
        layers = net.net.layers
    except (RuntimeError, AttributeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not the FID Inception TorchScript ({first}); "
                        f"run `reals assets fetch inception-fid --force`") from None
    if not hasattr(layers, "mixed_6") or not hasattr(layers, "pool2"):
        raise UserError(f"{path} is a TorchScript file but not the FID Inception (no mixed_6/pool2 layers)")
    return net.eval()


class OfflineInception(FeatureExtractorBase):
    """The offline TorchScript Inception as a torch-fidelity feature extractor ('2048', '2023')."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, verified=None, **kwargs):
        """`verified`: the network `choose_extractor` loaded and checked; else the asset, checked here."""
        super().__init__(name, features_list)
        if verified is None:
            from ..assets import asset_path, asset_sha256

            verified = load_torchscript(feature_extractor_weights_path or asset_path("inception-fid"),
                                        asset_sha256("inception-fid"))
        self.net = verified
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return POOL_FEATURE, SFID_FEATURE

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ValueError("the offline FID Inception has no classifier layer, so it cannot give an Inception "
                             "Score; use torch-fidelity's Inception weights for IS")
        return {"fid": POOL_FEATURE, "kid": POOL_FEATURE, "prc": POOL_FEATURE}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, images):
        x = prepare(images)
        wanted, features = set(self.features_list), {}
        # The layers one by one (what the TorchScript's own forward does), to read mixed_6/conv on the way.
        for name, layer in self.net.net.layers.named_children():
            if name == "mixed_6" and SFID_FEATURE in wanted:
                features[SFID_FEATURE] = sfid_vector(layer.conv(x))
                if wanted <= features.keys():
                    break
            x = layer(x)
        else:
            features[POOL_FEATURE] = x.flatten(1).float()
        return tuple(features[f] for f in self.features_list)


class TorchFidelityInception(FeatureExtractorBase):
    """torch-fidelity's InceptionV3 extractor plus ADM's sFID map ('2048', 'logits_unbiased', '2023').

    The sFID map is read with a forward hook on Mixed_6d.branch1x1, torch-fidelity's name
    for TF's mixed_6/conv; everything else is torch-fidelity's own forward.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, verified=None, **kwargs):
        """`verified`: the state dict `choose_extractor` read; else it is read here, from the given
        file or torch-fidelity's in the hub cache. torch-fidelity's own loader unpickles its
        file in full (which can run code): it gets these tensors, saved by us, never a path."""
        super().__init__(name, features_list)
        if verified is None:
            verified, _ = load_torch_fidelity_weights(feature_extractor_weights_path or torch_fidelity_weights())
        ours = io.BytesIO()
        torch.save(verified, ours)
        ours.seek(0)
        # With only the sFID map wanted, '768' (after Mixed_6e) stops the network just past it.
        inner = [f for f in features_list if f != SFID_FEATURE] or ["768"]
        try:
            self.inception = FeatureExtractorInceptionV3(f"{name}-inner", inner, feature_extractor_weights_path=ours,
                                                         **kwargs)
        except RuntimeError as e:  # load_state_dict: the keys are right (checked on reading), a shape is not
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).strip())
            raise UserError(f"the Inception weights do not fit torch-fidelity's InceptionV3 ({first}); pass "
                            f"torch-fidelity's weights-inception-2015-12-05-*.pth or use --extractor offline") from None
        self._spatial: torch.Tensor | None = None
        if SFID_FEATURE in features_list:
            self.inception.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.eval()

    def _keep_spatial(self, module, args, output):
        self._spatial = sfid_vector(output)

    @staticmethod
    def get_provided_features_list():
        return POOL_FEATURE, LOGITS_FEATURE, SFID_FEATURE

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, images):
        features = dict(zip(self.inception.features_list, self.inception(images)))
        if SFID_FEATURE in self.features_list:
            features[SFID_FEATURE], self._spatial = self._spatial, None
        return tuple(features[f] for f in self.features_list)


for _name, _cls in ((OFFLINE, OfflineInception), (TORCH_FIDELITY, TorchFidelityInception)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:  # registering twice is an error in torch-fidelity
        torch_fidelity.register_feature_extractor(_name, _cls)


# -- choosing one -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractorChoice:
    name: str  # the registered name
    weights: Path
    weights_sha256: str  # of the bytes `verified` was loaded from
    note: str = ""  # why this one, when `auto` fell back
    # What the network is built from, read once from `weights` and checked: torch-fidelity's state
    # dict, or the offline TorchScript module. The file is not opened again.
    verified: Any = field(default=None, repr=False, compare=False)

    @property
    def has_classifier(self) -> bool:
        return self.name == TORCH_FIDELITY

    def describe(self) -> dict:
        return {"name": self.name, "weights": str(self.weights), "weights_sha256": self.weights_sha256,
                "classifier": self.has_classifier, "note": self.note}

    def build(self, features: list[str], device: torch.device) -> FeatureExtractorBase:
        cls = FEATURE_EXTRACTORS_REGISTRY[self.name]
        return cls(self.name, features, verified=self.verified).to(device)


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def torch_fidelity_weights() -> Path:
    """torch-fidelity's weight file in the torch hub cache (where torch-fidelity keeps it), downloaded if absent."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)
    return path


def load_torch_fidelity_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256) of torch-fidelity's Inception weight file, read once with weights_only
    (no code runs): the bytes hashed are the bytes loaded."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weights file not found: {path}")
    data = path.read_bytes()
    state = torch_load(path, data=data)
    needed = ("Mixed_6d.branch1x1.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.weight")
    if not isinstance(state, dict) or not all(k in state for k in needed):
        raise UserError(f"{path} is not a torch-fidelity InceptionV3 state dict (it lacks e.g. {needed[-1]}); "
                        f"pass torch-fidelity's weights-inception-2015-12-05-*.pth or use --extractor offline")
    return state, hashlib.sha256(data).hexdigest()


def choose_extractor(kind: str = "auto", inception_weights: str | Path | None = None) -> ExtractorChoice:
    """torch-fidelity's weights where they can be had (a local file, the hub cache, a download), else the offline asset.

    `offline` and `torch-fidelity` insist on one; `auto` falls back to offline and says why in `.note`.
    """
    if kind not in EXTRACTORS:
        raise UserError(f"unknown extractor {kind!r}; use one of {', '.join(EXTRACTORS)}")
    note = ""
    if inception_weights is not None:
        if kind == "offline":
            raise UserError("--inception-weights is torch-fidelity's Inception weight file; "
                            "it cannot be combined with --extractor offline")
        path = Path(inception_weights)
        state, digest = load_torch_fidelity_weights(path)
        return ExtractorChoice(TORCH_FIDELITY, path, digest, verified=state)
    if kind in ("auto", "torch-fidelity"):
        try:
            path = torch_fidelity_weights()
        except OSError as e:  # URLError, timeouts and HTTP errors are all OSErrors
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            if kind == "torch-fidelity":
                raise UserError(f"cannot download torch-fidelity's Inception weights ({reason}); download "
                                f"{URL_INCEPTION_V3} where there is internet and pass it with --inception-weights, "
                                f"or use --extractor offline") from None
            note = f"torch-fidelity's Inception weights could not be downloaded ({reason}); used the offline asset"
        else:
            state, digest = load_torch_fidelity_weights(path)
            return ExtractorChoice(TORCH_FIDELITY, path, digest, verified=state)
    from ..assets import asset_path, asset_sha256

    path, digest = asset_path("inception-fid"), asset_sha256("inception-fid")
    return ExtractorChoice(OFFLINE, path, digest, note, verified=load_torchscript(path, digest))
