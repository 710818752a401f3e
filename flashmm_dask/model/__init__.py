"""The mixed model on summary statistics: fit, test, judge.

lmm      checked inputs (validation, pandas names, prepared shared terms) -> core
core     the fitting core on prepared shared terms, also called by the run's workers
fit      LmmFit, the result with its diagnostics
lmmtest  t-tests of coefficients and contrasts (residual or Satterthwaite df)
lrt      variance-component tests and likelihood-ratio tests of fixed effects
status   the one convergence rule and status code per feature
"""
