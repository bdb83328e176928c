"""Data: kvcast's default traces (JSON), written by `python -m traces.defaults`."""
