"""One managed component at run time: its layers, the streamed forward, step entry points, OOM recovery."""
