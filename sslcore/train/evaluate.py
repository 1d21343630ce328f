"""Frozen-feature evaluation: features in one pass over a split, then the probes.

* **The reported probes, in torch on the run's device** (every run, ``--eval-every`` during one, the
  studies): the weighted k-NN of InstDisc as solo-learn and lightly report it (cosine similarity to every
  training feature, the ``k = 200`` nearest vote with weight ``exp(s / 0.07)``), and multinomial logistic
  regression on standardised features by full-batch L-BFGS (scikit-learn's objective, on the GPU: the
  same numbers every run, nothing to tune, any size).  Keys ``linear`` and ``knn`` (top-1),
  ``linear_top5`` and ``knn_top5``.
* **scikit-learn's, opt-in** (``sklearn=True``, ``--sklearn-probes``; float64 on the CPU, up to
  :data:`SKLEARN_MAX_TRAIN` training samples): logistic regression on standardised features and a
  distance-weighted k-NN (k = 20, cosine).  Keys ``sklearn_linear`` and ``sklearn_knn``.  Study results
  written before 2026-12-07 hold these under ``linear``/``knn`` (``probe_family`` says which).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import check_data_spec, data_kind, load_dataset
from ..data.pipeline import sequential_loader
from ..methods import create_model, get_method
from .checkpoint import CheckpointError, check_state_dict, load_checkpoint

SKLEARN_MAX_TRAIN = 100_000
KNN_K, KNN_T = 200, 0.07


@torch.no_grad()
def extract_features(data, split: str, encoder: nn.Module | None, *, device: torch.device | None = None,
                     batch_size: int = 512, workers: int = 0, limit: int | None = None) -> torch.Tensor:
    """Features ``[N, F]`` (float32, on ``device``) of the ``split`` ("train" / "test") of ``data``: ``encoder``
    (eval mode) on the model's view of each image (:meth:`model_input`), or the raw features without one."""
    if encoder is not None:
        was_training = encoder.training
        encoder.eval()
        device = device or next(encoder.parameters()).device
    device = device or torch.device("cpu")
    feats = []
    for _, x in sequential_loader(data.items(split, limit), batch_size, workers=workers, device=device):
        x = x.to(device, non_blocking=True)
        feats.append((data.raw_features(x) if encoder is None else encoder(data.model_input(x))).float().flatten(1))
    if encoder is not None:
        encoder.train(was_training)
    return torch.cat(feats)


def fit_linear_probe(x_train, y_train, *, c: float = 1.0):
    """Logistic regression on standardised features (the scaler is fit on train only), fit to ``x_train``;
    ``.score(x, y)`` gives its accuracy on any features of the same kind (e.g. another domain's)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x_train, y_train)


def linear_probe(x_train, y_train, x_test, y_test, *, c: float = 1.0) -> float:
    """Test accuracy of :func:`fit_linear_probe`; with one class in the training split (nothing to separate),
    that of the classifier every fit gives there: the constant prediction of that class."""
    import numpy as np

    if len(np.unique(y_train)) < 2:
        return float(np.mean(np.asarray(y_test) == np.asarray(y_train)[0]))
    return float(fit_linear_probe(x_train, y_train, c=c).score(x_test, y_test))


def knn_accuracy(x_train, y_train, x_test, y_test, *, k: int = 20) -> float:
    """Test accuracy of a distance-weighted k-NN vote under cosine similarity (scikit-learn); ``k`` is capped at
    the training split's size."""
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(x_train)), metric="cosine", weights="distance")
    return float(clf.fit(x_train, y_train).score(x_test, y_test))


def _topk_hits(scores: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """How many rows of ``scores`` [n, C] have ``y`` first, and among their top 5 (top ``C`` when C < 5)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == y[:, None]
    return int(hits[:, 0].sum()), int(hits.any(1).sum())


@torch.no_grad()
def weighted_knn(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor, *,
                 k: int = KNN_K, temperature: float = KNN_T, chunk: int = 1024) -> dict[str, float]:
    """InstDisc's k-NN: each test feature's ``k`` most cosine-similar training features vote for their class
    with weight ``exp(s / temperature)``; top-1 and top-5 accuracy of the votes."""
    classes = int(max(y_train.max(), y_test.max())) + 1
    train = F.normalize(f_train.float(), dim=1)
    y_train = y_train.to(train.device)
    k = min(k, len(train))
    top1 = top5 = 0
    for q, y in zip(f_test.split(chunk), y_test.to(train.device).split(chunk)):
        sim, idx = (F.normalize(q.float(), dim=1) @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(q), classes, device=train.device)
        votes.scatter_add_(1, y_train[idx], (sim / temperature).exp())
        a, b = _topk_hits(votes, y)
        top1, top5 = top1 + a, top5 + b
    return {"knn_top1": top1 / len(f_test), "knn_top5": top5 / len(f_test)}


def linear_classifier(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor, *,
                      c: float = 1.0, max_iter: int = 500) -> dict[str, float]:
    """Multinomial logistic regression on features standardised with the training split's mean and std, fit
    by full-batch L-BFGS on the features' device: the objective of scikit-learn's ``LogisticRegression(C=c)``
    (mean cross-entropy + ``|W|^2 / (2 c N)``), so no learning rate or schedule to tune and the same
    numbers every run; top-1 and top-5 test accuracy."""
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    train, test = (f_train - mean) / std, (f_test - mean) / std
    y_train, y_test = y_train.to(train.device), y_test.to(train.device)
    classes = int(max(y_train.max(), y_test.max())) + 1
    weight = torch.zeros(train.shape[1], classes, device=train.device, requires_grad=True)
    bias = torch.zeros(classes, device=train.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    penalty = 1 / (2 * c * len(train))

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, y_train) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    with torch.no_grad():
        top1, top5 = _topk_hits(test @ weight + bias, y_test)
    return {"linear_top1": top1 / len(test), "linear_top5": top5 / len(test)}


def probe(data, encoder: nn.Module | None, *, device: torch.device | None = None, workers: int = 0,
          batch_size: int = 512, sklearn: bool = False) -> dict[str, float]:
    """Held-out accuracies of ``encoder``'s frozen features (``None``: the raw features), extracted in batches of
    ``batch_size``: the reported torch probes (``linear``, ``knn`` and their top-5), and scikit-learn's
    (``sklearn_linear``, ``sklearn_knn``) when ``sklearn`` and the training split has at most
    :data:`SKLEARN_MAX_TRAIN` samples."""
    f_train, f_test = (extract_features(data, split, encoder, device=device, workers=workers, batch_size=batch_size)
                       for split in ("train", "test"))
    knn = weighted_knn(f_train, data.y_train, f_test, data.y_test)
    lin = linear_classifier(f_train, data.y_train, f_test, data.y_test)
    out = {"linear": lin["linear_top1"], "knn": knn["knn_top1"], "linear_top5": lin["linear_top5"],
           "knn_top5": knn["knn_top5"]}
    if sklearn and len(f_train) <= SKLEARN_MAX_TRAIN:
        a, b = f_train.double().cpu().numpy(), f_test.double().cpu().numpy()
        y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
        out.update(sklearn_linear=linear_probe(a, y_train, b, y_test), sklearn_knn=knn_accuracy(a, y_train, b, y_test))
    return out


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


def evaluate_checkpoint(path, *, device: torch.device | str = "cpu", data: str | None = None,
                        workers: int = 0) -> dict:
    """Probe the encoder of a saved pretraining checkpoint on the held-out split of its dataset, or of
    ``data`` (a ``--data`` spec: transfer to another dataset or domain; the probe is fit on that
    dataset's training split, the encoder stays frozen)."""
    model, ckpt, dataset = load_encoder(path, data)
    cfg = ckpt["config"]
    device = torch.device(device)
    return {"method": cfg["method"], "data": data or cfg["data"], "trained_on": cfg["data"], "encoder": cfg["encoder"],
            "epoch": ckpt["epoch"], "n_test": len(dataset.y_test),
            **probe(dataset, model.to(device), device=device, workers=workers)}


__all__ = ["KNN_K", "KNN_T", "SKLEARN_MAX_TRAIN", "build_model", "evaluate_checkpoint", "extract_features",
           "fit_linear_probe", "knn_accuracy", "linear_classifier", "linear_probe", "load_encoder", "probe",
           "weighted_knn"]
