"""The fusion model: pretrained text / image encoders + a small attribute network, fused, softmax heads.

Where things live: ``features`` (hashed seller-table and word features), ``encoders`` (the
pretrained encoders and the disk cache of their features), ``layers`` (the three fusion methods),
``anchor`` (the name-anchored text encoder and its names / neighbours members), ``lexicon`` (the
TF-IDF + logistic-regression member), ``vote`` (how each attribute head's members are mixed),
``model`` (the config, the model, its save / load, predictor and collator).
"""

from mmllm.models.fusion.encoders import (AttributeEncoder, Encoders, FeatureCache, FeatureSettings, Featurizer,
                                         row_key)
from mmllm.models.fusion.features import attribute_tokens, category_name, lexical_features
from mmllm.models.fusion.layers import FUSIONS, AttentionFusion, CoAttentionFusion, ConcatFusion
from mmllm.models.fusion.model import (
    FUSION_CONFIG,
    FUSION_FILE,
    MODALITIES,
    FusionCollator,
    FusionConfig,
    FusionModel,
    FusionPredictor,
    load_fusion,
    value_name_vectors,
)

__all__ = [
    "FUSIONS", "FUSION_CONFIG", "FUSION_FILE", "MODALITIES",
    "AttentionFusion", "AttributeEncoder", "CoAttentionFusion", "ConcatFusion", "Encoders", "FeatureCache",
    "FeatureSettings", "Featurizer", "FusionCollator", "FusionConfig", "FusionModel", "FusionPredictor",
    "attribute_tokens", "category_name", "lexical_features", "load_fusion", "row_key", "value_name_vectors",
]
