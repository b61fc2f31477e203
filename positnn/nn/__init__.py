"""Posit modules: each holds a LayerPolicy, O master weights with cached F/B copies, NaR
counters, and calls one op of ``positnn.functional`` in its forward."""

from ._base import PositModule as PositModule
from ._base import load_state_dict as load_state_dict
from .activation import Dropout as Dropout
from .activation import Flatten as Flatten
from .activation import LeakyReLU as LeakyReLU
from .activation import LogSoftmax as LogSoftmax
from .activation import ReLU as ReLU
from .activation import Sigmoid as Sigmoid
from .activation import Tanh as Tanh
from .linear import Conv2d as Conv2d
from .linear import Linear as Linear
from .loss import CrossEntropyLoss as CrossEntropyLoss
from .loss import MSELoss as MSELoss
from .normalization import BatchNorm1d as BatchNorm1d
from .normalization import BatchNorm2d as BatchNorm2d
from .pooling import AvgPool2d as AvgPool2d
from .pooling import MaxPool2d as MaxPool2d

__all__ = [
    "PositModule", "load_state_dict", "Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "ReLU", "LeakyReLU",
    "Sigmoid", "Tanh", "Dropout", "Flatten", "LogSoftmax", "BatchNorm1d", "BatchNorm2d", "CrossEntropyLoss",
    "MSELoss",
]
