"""Helpers shared by the checkpoint tests."""


def leftovers(folder):
    """Temp or renamed-away folders an atomic write may have left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
