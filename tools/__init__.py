"""Developer tools, run from a checkout and not shipped with the app (pyproject.toml packages
only engine*, model_registry*, ui*):

    python -m tools.measure_sizes [--check]   # recompute the component sizes stored in models.json
    python -m tools.screenshot [--url URL]    # write assets/screenshot.png
"""
