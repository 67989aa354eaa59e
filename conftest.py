# Import obdask before distributed.utils_test resets dask.config in gen_cluster,
# so the obdask defaults are part of the config that every test starts from.
import obdask  # noqa: F401
