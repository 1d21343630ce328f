"""Frozen-feature evaluation: a linear probe (logistic regression) and a k-NN classifier."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from ..data import ImageData, check_data_spec, data_kind, load_dataset
from ..methods import create_model, get_method
from .checkpoint import CheckpointError, check_state_dict, load_checkpoint


@torch.no_grad()
def extract_features(encoder: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> np.ndarray:
    """``encoder(x)`` in eval mode, in batches, as a float64 numpy array ``[N, F]``."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats = [encoder(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    encoder.train(was_training)
    return torch.cat(feats).flatten(1).double().numpy()


def linear_probe(x_train, y_train, x_test, y_test, *, c: float = 1.0) -> float:
    """Test accuracy of logistic regression on standardised features (the scaler is fit on train only)."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    return float(clf.fit(x_train, y_train).score(x_test, y_test))


def knn_accuracy(x_train, y_train, x_test, y_test, *, k: int = 20) -> float:
    """Test accuracy of a distance-weighted k-NN vote under cosine similarity."""
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance")
    return float(clf.fit(x_train, y_train).score(x_test, y_test))


def probe(data: ImageData, encoder: nn.Module | None) -> dict[str, float]:
    """``{"linear": acc, "knn": acc}`` on the held-out split; ``encoder=None`` probes the raw pixels."""
    if encoder is None:
        f_train, f_test = (data.raw_features(x).double().numpy() for x in (data.x_train, data.x_test))
    else:
        f_train, f_test = extract_features(encoder, data.x_train), extract_features(encoder, data.x_test)
    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
    return {"linear": linear_probe(f_train, y_train, f_test, y_test),
            "knn": knn_accuracy(f_train, y_train, f_test, y_test)}


def build_model(config: dict, data, **extra):
    """The method of a run's config (a ``PretrainConfig`` as a dict) with its options (and ``extra``), for ``data``."""
    common = {"temperature": config["temperature"]} if config["temperature"] is not None else {}
    options = {**common, "backend": config["backend"], **config.get("options", {}), **extra}
    return create_model(config["method"], data, encoder=config["encoder"], **options)


def _check_kind(method: str, kind: str, label: str) -> None:
    """Refuse data of another kind than ``method`` trains on (``label``: the data, for the message)."""
    kinds = get_method(method).data_kinds
    if kind not in kinds:
        raise CheckpointError(f"a checkpoint of method {method!r} takes {' or '.join(kinds)} data; {label} is "
                              f"{kind} data")


def load_encoder(path, data=None):
    """The trained method of a checkpoint (eval mode, on the CPU), built for ``data`` (a dataset or a
    ``--data`` spec, checked before it is loaded; default: its own dataset), and that data; a
    ``CheckpointError`` when the weights do not fit a model for ``data``."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    if data is None or isinstance(data, str):
        spec = check_data_spec(cfg["data"] if data is None else data)
        _check_kind(ckpt["method"], data_kind(spec), f"--data {spec}")
        data = load_dataset(spec)
    _check_kind(ckpt["method"], data.kind, data.name)
    model = build_model(cfg, data)
    try:
        check_state_dict("model", ckpt["model"], model.state_dict())
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the checkpoint was trained on --data {cfg['data']}; {data.describe()})") from None
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt, data


def evaluate_checkpoint(path, *, device: torch.device | str = "cpu", data: str | None = None) -> dict:
    """Probe the encoder of a saved pretraining checkpoint on the held-out split of its dataset, or of
    ``data`` (a ``--data`` spec: transfer to another dataset or domain; the probe is fit on that
    dataset's training split, the encoder stays frozen)."""
    model, ckpt, dataset = load_encoder(path, data)
    cfg = ckpt["config"]
    return {"method": cfg["method"], "data": data or cfg["data"], "trained_on": cfg["data"], "encoder": cfg["encoder"],
            "epoch": ckpt["epoch"], "n_test": len(dataset.y_test), **probe(dataset, model.to(device))}
