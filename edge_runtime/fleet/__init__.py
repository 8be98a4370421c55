"""The MQTT fleet: wire protocol, chunked transfers, broker, device agent and aggregator."""
