"""Reading expression data and writing what a run produces.

readers          read_expression: stores, URLs and in-memory data -> a lazy Expression
_stores, _blocks AnnData/Zarr/HDF5 stores: metadata, lazy row chunks of the matrix
obs              cell metadata (obs) from stores, frames and CSV files
soma             TileDB-SOMA experiments
paths            Location: a local path or fsspec URL, resolved once for every store
writing          staged (atomic) writes of every store and file; the versions collector
anndata_store    AnnData .zarr/.h5ad stores written atomically (and streamed by simulate)
results          the results store: create, write blocks, finalize, open
results_layout   what a results store holds (variables, dimensions, ResultsLayout)
results_attrs    its attributes: redaction, JSON checks, default versions
strata_results   the stratified results store: strata groups, tables, retests
tables           tidy results tables, written as CSV and Parquet
resultsets       results of a fit or a store as (stratum, Dataset) pairs; top tables
anndata_results  results into adata.varm and adata.uns
outputs          the manifest of what the package owns in an output folder
"""
