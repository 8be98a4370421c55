"""Flower (flwr 1.42, the `flower` extra) as one more transport of the round engine.

`strategy.LoRARoundStrategy` is a Flower server `Strategy` that runs this project's
round engine (`rounds.server.AggregatorService`): any of FedAvg-LoRA, HetLoRA, FlexLoRA,
SA-FedLoRA, LEGEND or FLoRA, each device at its own rank and depth. `client.make_client_app`
builds the matching `ClientApp` around the device side (`rounds.device.run_local_round`).
Adapters cross Flower as this project's update bytes (`fleet.codec`: no pickle) inside
ConfigRecords, and the server validates them exactly as the MQTT aggregator does.
"""
