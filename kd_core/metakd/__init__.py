"""Meta-KD (Pan et al., ACL 2021, arXiv 2012.01266): a meta-teacher across domains, then
meta-distillation into one small student per domain.

* :mod:`.core`       - the math: prototypes (Eq. 1), prototype scores (Eq. 2), λ, domain corruption,
  few-shot subsampling
* :mod:`.objectives` - the meta-teacher and (weighted) distillation objectives and their trainer
* :mod:`.stages`     - the meta-kd flow's stage functions and report
"""
