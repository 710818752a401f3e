"""Pure NumPy/SciPy numerics of FLASH-MM, feature axis first; no Dask, Zarr or pandas."""
