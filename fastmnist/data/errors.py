"""The data layer's exceptions. Every message names the file (or folder, or URL) it is about."""


class DatasetError(ValueError):
    """A data file or folder is missing, malformed or inconsistent."""


class DownloadError(RuntimeError):
    """A dataset file could not be downloaded intact from any mirror."""
