"""The summary statistics (XX, XY, ZX, ZY, ZZ, Ynorm, n), reduced in one pass over the data.

summary        SummaryStats: the seven statistics, with save, load and merge
store          its Zarr store (format, atomic writes, checked read)
reduce         chunked expression -> SummaryStats with Dask, one read of the data
reduce_strata  the same for every stratum at once
graph          the pieces of their task graphs: inline reads, obs slices, runs of chunks
blocks         one expression block: conversion, checks, transform, partial products
products       the compiled sparse-block products X'E, Z'E, Ynorm
strata_products  the same for every stratum of a block in one compiled pass
strata         StratifiedStats: level -> SummaryStats, saved as one store
"""
