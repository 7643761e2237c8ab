"""Layer 3: models and data sets for studies of loss-landscape geometry.

``model(name, **options)`` builds a network of the registry (``models()`` lists the
names and their options with defaults); ``dataset(name, ...)`` loads or generates
a data set (``datasets()`` lists them); ``shift`` makes a domain-shifted copy;
``surface(name)`` is a closed-form two-parameter loss.
"""

from lossgeom.zoo._cnn import cnn
from lossgeom.zoo._digits import digits
from lossgeom.zoo._domain_shift import shift
from lossgeom.zoo._init import scale_init
from lossgeom.zoo._mlp import mlp
from lossgeom.zoo._models import model, models
from lossgeom.zoo._offline import dataset, datasets, read_idx
from lossgeom.zoo._resnet import cifar_resnet, resnet
from lossgeom.zoo._surfaces import surface
from lossgeom.zoo._transformer import transformer
from lossgeom.zoo._vit import vit

__all__ = [
    # registry
    "model",
    "models",
    # model factories
    "cifar_resnet",
    "cnn",
    "mlp",
    "resnet",
    "scale_init",
    "transformer",
    "vit",
    # data
    "dataset",
    "datasets",
    "digits",
    "read_idx",
    "shift",
    # two-parameter surfaces
    "surface",
]
