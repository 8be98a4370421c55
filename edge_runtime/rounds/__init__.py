"""The round engine: one server side (`server.py`) and one device side (`device.py`)."""
