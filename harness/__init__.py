"""cmbench: consistency models trained and compared on one harness."""


def version() -> str:
    """The installed cmbench version (pyproject.toml's), for every command's --version."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return installed("cmbench")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"
