"""The data path to the computation device: device backends, pinned host memory, the transfer scheduler."""
