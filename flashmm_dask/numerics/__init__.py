"""Pure NumPy/SciPy numerics of FLASH-MM, feature axis first; no Dask, Zarr or pandas.

fisher        batched Fisher scoring of the variance components (REML or ML)
scores        their score and information in NumPy (the reference algebra)
structured    the same through the block structure of Z'Z (K >= 2, one diagonal block)
structured_nested  REML's correction there for nested factors (a diagonal Schur complement)
compiled_nested  its compiled kernels (Fisher scoring in one loop per feature)
compiled_nested_pre  its first kernel: one evaluation's pieces before C^-1
compiled      per-feature kernels of the fitter, compiled with numba
spectral      the compiled kernels of one random component (K = 1)
boundary      variance components constrained to be non-negative
fixed         fixed effects, their covariance and information, BLUPs
satterthwaite Satterthwaite degrees of freedom of t-tests
satterthwaite_structured  their terms through the block structure of Z'Z (no q x q matrix)
inference     t-tests of coefficients and contrasts, multiple-testing adjustment
loglik        log-likelihoods and likelihood-ratio tests
linalg        batched linear algebra shared by the fitter
nb_sparse     negative binomial counts drawn in sparse form (the simulator)
paired        K = 2 components whose Z'Z pairs their columns (intercept and slope)
compiled_k    compiled K = 2 scoring (Schur complement in the eigenbases of the diagonal
              blocks) and sums of the structured path with a dense Schur complement
compiled_dense  small dense kernels of the K = 2 path (row products, inverses, residuals)
jit           the one numba compile wrapper (cached on disk where possible)
"""
