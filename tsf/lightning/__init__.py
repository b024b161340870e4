"""Lightning adapters: the sampling module and the (condition, sample_id) data modules."""

from tsf.lightning.data import SampleIdsDataModule
from tsf.lightning.sampling import SamplingModule

__all__ = ["SamplingModule", "SampleIdsDataModule"]
