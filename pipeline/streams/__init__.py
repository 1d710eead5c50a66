"""Streams as configuration: the stream file (config.py), its decoders (decode.py), `pipeline streams` (cli.py)."""
