"""CTR models: each a short composition of the blocks in layers.py.

build_model(name, schema, ...) builds one; every model takes (dense, sparse) and returns logits.
The arguments are explicit: a model that does not use one (LR has no MLP) is not handed it, and
a misspelt keyword is an error, not silently ignored."""
from .dcn import DCN
from .deepfm import DeepFM
from .dnn import DNN
from .fm import FM
from .layers import FieldSchema, criteo_schema
from .lr import LR

MODELS = ["lr", "fm", "dnn", "deepfm", "dcn", "dcnv2"]


def build_model(name, schema, emb_dim=16, mlp=(400, 400, 400), dropout=0.0, cross_layers=3,
                sparse=False):
    """name in MODELS; schema a FieldSchema (or an int: the table rows of the Criteo layout)."""
    if isinstance(schema, int):
        schema = FieldSchema(n_buckets=schema)
    mlp = tuple(mlp)
    if name == "lr":
        return LR(schema, sparse)
    if name == "fm":
        return FM(schema, emb_dim, sparse)
    if name == "dnn":
        return DNN(schema, emb_dim, mlp, dropout, sparse)
    if name == "deepfm":
        return DeepFM(schema, emb_dim, mlp, dropout, sparse)
    if name in ("dcn", "dcnv2"):
        return DCN(schema, emb_dim, mlp, dropout, cross_layers, 1 if name == "dcn" else 2,
                   sparse)
    raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}")


__all__ = ["MODELS", "build_model", "FieldSchema", "criteo_schema"]
