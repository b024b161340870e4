"""Lightning adapters: the sampling module, the value-network trainer, the (condition, sample_id) data modules."""

from tsf.lightning.data import SampleIdsDataModule
from tsf.lightning.sampling import SamplingModule
from tsf.lightning.value import ValueModule

__all__ = ["SamplingModule", "SampleIdsDataModule", "ValueModule"]
