"""The design: formulas -> X, Z and R's model.matrix names, checked before any data pass.

formula     Design and build_design (formulaic, with R's coding from terms)
terms       R's model.matrix coding of one formula on top of formulaic
fast        the same matrices built directly from factor codes (the hot path)
groupings   integer grouping columns read as factors, as lme4 reads (1|donor)
check       random components that the fixed effects absorb (refused)
contrasts   contrast strings -> a contrast matrix L
selection   cell selection strings -> a boolean mask
strata      which cells each model sees, and each stratum's design
"""
