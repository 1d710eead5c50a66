"""Adapters that put this project's scoring inside other stream frameworks (faust-streaming: `faust`)."""
