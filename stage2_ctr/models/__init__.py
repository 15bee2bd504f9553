"""CTR models: each a short composition of the blocks in layers.py. build_model(name, ...)."""
from .dcn import DCN
from .deepfm import DeepFM
from .dnn import DNN
from .fm import FM
from .lr import LR

MODELS = {"lr": LR, "fm": FM, "dnn": DNN, "deepfm": DeepFM, "dcn": DCN, "dcnv2": DCN}


def build_model(name, n_buckets, **kw):
    if name == "dcnv2":
        kw["cross_version"] = 2
    return MODELS[name](n_buckets, **kw)
