"""The ``mtcnn`` package's weight files (joblib lists of float32 Keras arrays) into the networks.

The weight files are pickles (joblib): load only the package's own, or copies you trust.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from detect.mtcnn_port.networks import NETWORKS, _KerasPort
from util.assets import require_file

WEIGHT_FILES = {"pnet": "pnet.lz4", "rnet": "rnet.lz4", "onet": "onet.lz4"}
WEIGHTS_HELP = (
    "The MTCNN weights ship with the `mtcnn` pip package: `pip install mtcnn==1.0.0` (it needs "
    "only joblib and lz4; TensorFlow is an optional extra), or pass weights_dir= a folder "
    "holding pnet.lz4, rnet.lz4 and onet.lz4."
)


def package_weights_dir() -> str:
    """The ``assets/weights`` folder of the installed ``mtcnn`` package, found without importing it
    (importing ``mtcnn`` imports TensorFlow)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MTCNN weights: the `mtcnn` package is not installed. {WEIGHTS_HELP}")
    return os.path.join(list(spec.submodule_search_locations)[0], "assets", "weights")


def load_keras_arrays(name: str, weights_dir: str | None = None) -> list[np.ndarray]:
    """The package's weight list for a network.

    Args:
        name: "pnet", "rnet" or "onet".
        weights_dir: folder holding the .lz4 files; default :func:`package_weights_dir`.

    Returns:
        the Keras arrays (HWIO conv kernels, (in, out) dense kernels, biases, PReLU alphas).

    Raises:
        FileNotFoundError: the package or the file is missing (the message says how to get it).
        ValueError: the file is not a list of arrays.
    """
    import joblib  # noqa: PLC0415 - only needed here

    folder = weights_dir if weights_dir is not None else package_weights_dir()
    path = require_file(os.path.join(folder, WEIGHT_FILES[name]), f"MTCNN {name} weights", WEIGHTS_HELP)
    arrays = joblib.load(path)
    if not isinstance(arrays, list) or not all(isinstance(a, np.ndarray) for a in arrays):
        raise ValueError(f"{path}: expected a list of numpy arrays, got {type(arrays).__name__}")
    return arrays


def load_network(name: str, weights_dir: str | None = None) -> _KerasPort:
    """A PNet/RNet/ONet in eval mode, without gradients, with the package's weights, on the CPU.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_keras_arrays`; ValueError also for arrays
            of the wrong number or shape.
    """
    net = NETWORKS[name]()
    net.load_keras_weights(load_keras_arrays(name, weights_dir))
    return net.eval().requires_grad_(False)
