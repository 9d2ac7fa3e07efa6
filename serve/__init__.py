"""mriseg-serve: distributed serving of TotalSegmentator MRI's six nnU-Net v2 sub-models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mriseg-serve")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"
