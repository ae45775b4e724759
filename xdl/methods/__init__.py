"""The algorithms analyzers wrap, as batched tensor code: FGSM/PGD (robust), AutoAttack, the
gradient-masking checks, common corruptions, membership inference (privacy), data quality,
and paired statistics for comparing runs (paired).

Imports: the ground modules, xdl.data, xdl.models and xdl.runs. Adversarial training uses
robust, so these sit below xdl.training; a method that retrains a model is handed the
training function by its analyzer.
"""
