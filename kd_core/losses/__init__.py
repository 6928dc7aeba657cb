"""Pure-torch knowledge-distillation losses, one module per recipe.

* :mod:`.tinybert`   - TinyBERT Eq. 7-10: ``attention_mse``, ``hidden_mse``, ``soft_cross_entropy``
* :mod:`.minilm`     - MiniLM Eq. 6-8 and MiniLMv2 relations: ``minilm_attention_kl``,
  ``minilm_value_relation_kl``, ``minilmv2_relation_kl``
* :mod:`.distilbert` - DistilBERT: ``kl_divergence_loss``, ``cosine_embedding_loss``,
  ``masked_lm_loss``, ``distilbert_loss``
* :mod:`.hard`       - ground-truth losses: ``hard_cross_entropy``, ``regression_mse``
* :mod:`.registry`   - ``LOSSES`` / ``get_loss`` / ``LossSpec`` for config-driven lookup
"""

from .distilbert import cosine_embedding_loss, distilbert_loss, kl_divergence_loss, masked_lm_loss
from .hard import hard_cross_entropy, regression_mse
from .minilm import minilm_attention_kl, minilm_value_relation_kl, minilmv2_relation_kl
from .registry import LOSSES, LossSpec, get_loss
from .tinybert import attention_mse, hidden_mse, soft_cross_entropy

__all__ = [
    "attention_mse",
    "hidden_mse",
    "soft_cross_entropy",
    "minilm_attention_kl",
    "minilm_value_relation_kl",
    "minilmv2_relation_kl",
    "kl_divergence_loss",
    "cosine_embedding_loss",
    "masked_lm_loss",
    "distilbert_loss",
    "hard_cross_entropy",
    "regression_mse",
    "LossSpec",
    "LOSSES",
    "get_loss",
]
